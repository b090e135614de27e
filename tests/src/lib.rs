//! `TestCluster`: a real coordinator (the library, serving gRPC on 127.0.0.1:0 inside the test) and real
//! `simclr-worker` processes dialing it, with helpers to signal workers by rank, follow the job's
//! events and read each worker's log and exit code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use simclr_common::{JobConfig, PeerTable};
use simclr_coordinator::{Coordinator, Job, JobEvent, JobOutcome};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::broadcast;

/// Directory holding the workspace's binaries (target/<profile>), built once per test process.
pub fn binaries_dir() -> Result<&'static Path> {
    static DIR: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| build_binaries().map_err(|e| format!("{e:#}"))).as_deref().map_err(|e| anyhow::anyhow!("{e}"))
}

fn build_binaries() -> Result<PathBuf> {
    // Test executables live in target/<profile>/deps; the binaries one level up.
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).context("test executable has no target directory")?.to_path_buf();
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.args(["build", "--quiet", "--bins", "-p", "simclr-worker", "-p", "simclr-coordinator"]);
    if dir.file_name().is_some_and(|n| n == "release") {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo build for the binaries")?;
    if !status.success() {
        bail!("cargo build of the binaries failed: {status}");
    }
    for name in ["simclr-worker", "simclr-coordinator"] {
        if !dir.join(name).is_file() {
            bail!("{} missing after cargo build", dir.join(name).display());
        }
    }
    Ok(dir)
}

/// A config for tests: fast heartbeats, short timeouts, a few preflight rounds.
pub fn test_config(world_size: u32) -> JobConfig {
    let mut config = JobConfig::default();
    config.job.id = "test-job".into();
    config.cluster.world_size = world_size;
    config.cluster.listen = "127.0.0.1:0".into();
    config.cluster.rendezvous_timeout_ms = 30_000;
    config.cluster.heartbeat_interval_ms = 100;
    config.cluster.heartbeat_timeout_ms = 1_500;
    config.cluster.peer_timeout_ms = 500;
    config.cluster.shutdown_grace_ms = 5_000;
    // The in-process harness runs one attempt (`Coordinator::wait`); restarts are the launchers'.
    config.cluster.max_restarts = 0;
    config.preflight.rounds = 3;
    // These jobs test membership and phases without a dataset: nothing to pretrain.
    config.pretrain.enabled = false;
    config
}

/// Makes the preflight phase last long enough (minutes) for a test to act while the job runs.
pub fn long_running(mut config: JobConfig) -> JobConfig {
    config.preflight.rounds = 1_000_000;
    config.preflight.interval_ms = 20;
    config
}

pub struct WorkerProcess {
    pub pid: u32,
    child: Child,
    log: Arc<Mutex<String>>,
}

impl WorkerProcess {
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Waits for the process to exit; returns its exit code (signal deaths as 128 + n).
    pub async fn wait(&mut self) -> Result<i32> {
        let status = self.child.wait().await?;
        // Give the log forwarder a moment to drain the pipe.
        tokio::time::sleep(Duration::from_millis(50)).await;
        Ok(exit_code(status))
    }
}

pub struct TestCluster {
    pub addr: SocketAddr,
    pub job: Arc<Job>,
    pub run_dir: tempfile::TempDir,
    coordinator: Option<Coordinator>,
    events: broadcast::Receiver<JobEvent>,
    pub workers: Vec<WorkerProcess>,
}

impl TestCluster {
    /// Starts the coordinator (not the workers) for `config`.
    pub async fn start(config: JobConfig) -> Result<TestCluster> {
        Self::start_with_token(config, None).await
    }

    /// Starts the coordinator with a cluster token that every worker must present.
    pub async fn start_with_token(mut config: JobConfig, token: Option<&str>) -> Result<TestCluster> {
        // Build the binaries before the coordinator's clocks (rendezvous timeout) start.
        binaries_dir()?;
        let run_dir = tempfile::tempdir()?;
        config.job.run_dir = Some(run_dir.path().to_path_buf());
        config.validate()?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let coordinator = Coordinator::start(config, listener, token, None)?;
        Ok(TestCluster {
            addr: coordinator.addr,
            job: coordinator.job(),
            events: coordinator.job().subscribe(),
            coordinator: Some(coordinator),
            run_dir,
            workers: Vec::new(),
        })
    }

    /// The coordinator's attempts (for its metrics endpoint).
    pub fn jobs(&self) -> Result<Arc<simclr_coordinator::Jobs>> {
        self.coordinator.as_ref().map(|c| c.jobs.clone()).context("the coordinator has stopped")
    }

    /// Spawns a worker process dialing this coordinator; returns its index in `workers`.
    pub fn spawn_worker(&mut self, extra_args: &[&str]) -> Result<usize> {
        self.spawn_worker_with_token(extra_args, None)
    }

    /// Spawns a worker that finds this coordinator, its rank and the world size through the launcher
    /// variables `env` (plus `MASTER_ADDR`/`MASTER_PORT` when `torchrun` is set), not through flags.
    pub fn spawn_worker_by_env(&mut self, env: &[(&str, &str)], torchrun: bool) -> Result<usize> {
        let (host, port) = (self.addr.ip().to_string(), self.addr.port().to_string());
        let mut all: Vec<(&str, &str)> = env.to_vec();
        if torchrun {
            all.extend([("MASTER_ADDR", host.as_str()), ("MASTER_PORT", port.as_str())]);
        }
        let worker = spawn_worker_process_with(None, &[], None, &all)?;
        self.workers.push(worker);
        Ok(self.workers.len() - 1)
    }

    /// Spawns a worker that presents `token` (through SIMCLR_CLUSTER_TOKEN).
    pub fn spawn_worker_with_token(&mut self, extra_args: &[&str], token: Option<&str>) -> Result<usize> {
        let addr = format!("http://{}", self.addr);
        let worker = spawn_worker_process(&addr, extra_args, token)?;
        self.workers.push(worker);
        Ok(self.workers.len() - 1)
    }

    pub async fn wait_event(&mut self, timeout: Duration, mut want: impl FnMut(&JobEvent) -> bool) -> Result<JobEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Ok(event)) if want(&event) => return Ok(event),
                Ok(Ok(_)) => {}
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
                Ok(Err(broadcast::error::RecvError::Closed)) => bail!("job event stream closed"),
                Err(_) => bail!("no matching job event within {timeout:?}; worker logs:\n{}", self.logs()),
            }
        }
    }

    pub async fn wait_rendezvous(&mut self, timeout: Duration) -> Result<PeerTable> {
        match self.wait_event(timeout, |e| matches!(e, JobEvent::RendezvousComplete { .. })).await? {
            JobEvent::RendezvousComplete { table } => Ok(table),
            _ => unreachable!(),
        }
    }

    /// Index in `workers` of the process holding `rank`.
    pub fn worker_of_rank(&self, rank: u32) -> Result<usize> {
        let table = self.job.peer_table().context("no rendezvous yet")?;
        let pid = table.get(rank).context("no such rank")?.pid;
        self.workers.iter().position(|w| w.pid == pid).context("rank's pid is not one of ours")
    }

    pub fn signal_rank(&self, rank: u32, signal: i32) -> Result<u32> {
        let pid = self.workers[self.worker_of_rank(rank)?].pid;
        // SAFETY: plain syscall on our own child.
        if unsafe { libc::kill(pid as i32, signal) } != 0 {
            bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
        }
        Ok(pid)
    }

    /// Waits for worker `index` to exit; returns its exit code (signal deaths as 128 + n).
    pub async fn wait_worker(&mut self, index: usize, timeout: Duration) -> Result<i32> {
        let worker = &mut self.workers[index];
        match tokio::time::timeout(timeout, worker.wait()).await {
            Ok(code) => code,
            Err(_) => {
                bail!("worker {index} (pid {}) still running after {timeout:?}; log:\n{}", worker.pid, worker.log())
            }
        }
    }

    /// Waits for the job to end and returns the coordinator's outcome.
    pub async fn outcome(&mut self, timeout: Duration) -> Result<JobOutcome> {
        let coordinator = self.coordinator.take().context("outcome already taken")?;
        tokio::time::timeout(timeout, coordinator.wait())
            .await
            .with_context(|| format!("job still running after {timeout:?}; worker logs:\n{}", self.logs()))
    }

    pub fn logs(&self) -> String {
        self.workers.iter().enumerate().map(|(i, w)| format!("--- worker {i} (pid {})\n{}", w.pid, w.log())).collect()
    }
}

/// Spawns `simclr-worker --coordinator ADDR` with loopback peer settings; stderr is captured.
pub fn spawn_worker_process(coordinator: &str, extra_args: &[&str], token: Option<&str>) -> Result<WorkerProcess> {
    spawn_worker_process_with(Some(coordinator), extra_args, token, &[])
}

/// Spawns a worker with loopback peer settings, `--coordinator` only when given, and the launcher
/// variables `env` (every other launcher variable removed, so the test's own environment never leaks in).
pub fn spawn_worker_process_with(
    coordinator: Option<&str>,
    extra_args: &[&str],
    token: Option<&str>,
    env: &[(&str, &str)],
) -> Result<WorkerProcess> {
    let binary = binaries_dir()?.join("simclr-worker");
    let mut cmd = Command::new(&binary);
    if let Some(coordinator) = coordinator {
        cmd.args(["--coordinator", coordinator]);
    }
    cmd.args(["--peer-listen", "127.0.0.1:0"]);
    for variable in simclr_common::launch_env::LAUNCHER_VARIABLES {
        cmd.env_remove(variable);
    }
    cmd.env_remove("SIMCLR_COORDINATOR");
    cmd.envs(env.iter().copied());
    if !extra_args.contains(&"--connect-timeout-ms") {
        cmd.args(["--connect-timeout-ms", "20000"]);
    }
    match token {
        Some(token) => cmd.env(simclr_common::TOKEN_ENV, token),
        None => cmd.env_remove(simclr_common::TOKEN_ENV),
    };
    let mut child = cmd
        .args(extra_args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("spawning {}", binary.display()))?;
    let pid = child.id().context("worker has no pid")?;
    let log = Arc::new(Mutex::new(String::new()));
    if let Some(stderr) = child.stderr.take() {
        let log = Arc::clone(&log);
        tokio::spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(mut l) = log.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
    }
    Ok(WorkerProcess { pid, child, log })
}

pub fn exit_code(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Polls `check` until it holds or `timeout` passes.
pub async fn eventually(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check()
}

/// `GET path` from `addr` over plain HTTP/1.1 (one request, `Connection: close` expected): the response
/// head and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(String, String)> {
    use tokio::io::AsyncWriteExt;
    let mut stream = tokio::net::TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    // One request per connection: the server closes it after the answer, which ends the read.
    stream.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut text = String::new();
    tokio::time::timeout(Duration::from_secs(30), tokio::io::AsyncReadExt::read_to_string(&mut stream, &mut text))
        .await
        .with_context(|| format!("GET {path} from {addr}: no complete answer within 30 s"))??;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok((head.to_string(), body.to_string()))
}

/// Whether the tests' outside tools (Python's tensorboard and prometheus_client, kubectl,
/// kubernetes-validate) must be there: `SIMCLR_EXPECT_TOOLS=1`, which scripts/test.sh sets after its
/// set-up installed them. Where it is set, a missing tool fails the test instead of skipping a check.
pub fn tools_expected() -> bool {
    std::env::var("SIMCLR_EXPECT_TOOLS").is_ok_and(|v| v == "1")
}

/// Runs `script` with the project's Python (`.venv/bin/python`, from `scripts/setup.sh --python`), with
/// `args` after it and `stdin` on its standard input. `Ok(None)`: that Python cannot start or has no
/// `module` (an error instead where [`tools_expected`]); otherwise its output, whatever its status.
pub fn run_python(
    module: &str,
    script: &str,
    args: &[&std::ffi::OsStr],
    stdin: &[u8],
) -> Result<Option<std::process::Output>> {
    use std::io::Write;
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let child = std::process::Command::new(&python)
        .arg("-c")
        .arg(script)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(e) if tools_expected() => {
            bail!("SIMCLR_EXPECT_TOOLS=1 but {} cannot start: {e} (scripts/setup.sh --python)", python.display())
        }
        Err(_) => return Ok(None),
    };
    child.stdin.take().context("python's stdin")?.write_all(stdin)?;
    let out = child.wait_with_output()?;
    if String::from_utf8_lossy(&out.stderr).contains(&format!("No module named '{module}'")) {
        anyhow::ensure!(
            !tools_expected(),
            "SIMCLR_EXPECT_TOOLS=1 but Python has no {module} (scripts/setup.sh --python)"
        );
        return Ok(None);
    }
    Ok(Some(out))
}
