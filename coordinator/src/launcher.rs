//! Dev-mode launcher: spawns `simclr-worker` processes on 127.0.0.1 (or on simulated hosts, each with
//! its own loopback address, decode cache and dataset mount), each told its rank, prefixes their logs
//! with that rank, reports each exit, and tears them all down. Workers run in their own process
//! group (a Ctrl-C in the terminal reaches the coordinator, which stops them in order) and get SIGTERM
//! from the kernel if the coordinator itself dies, so none is left behind.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus as ProcessStatus, Stdio};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::error::CoordinatorError;

/// Environment variable that overrides where the worker binary is looked up.
pub const WORKER_BIN_ENV: &str = "SIMCLR_WORKER_BIN";

/// Finds `simclr-worker`: `$SIMCLR_WORKER_BIN`, else next to the running coordinator binary.
pub fn find_worker_binary() -> Result<PathBuf, CoordinatorError> {
    if let Ok(path) = std::env::var(WORKER_BIN_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(CoordinatorError::WorkerBinary(format!("{WORKER_BIN_ENV}={} is not a file", path.display())))
        };
    }
    let exe = std::env::current_exe().map_err(|e| CoordinatorError::WorkerBinary(e.to_string()))?;
    let candidate = exe.with_file_name("simclr-worker");
    if candidate.is_file() {
        Ok(candidate)
    } else {
        Err(CoordinatorError::WorkerBinary(format!(
            "{} does not exist; build it (cargo build --bins) or set {WORKER_BIN_ENV}",
            candidate.display()
        )))
    }
}

pub struct LaunchOptions {
    pub worker_binary: PathBuf,
    pub workers: u32,
    /// `text` or `json`: passed on to the workers. JSON lines are not prefixed (they carry the rank).
    pub log_format: String,
    /// Extra arguments for every worker.
    pub extra_args: Vec<String>,
    /// `cpu`, `cuda` (worker k on `cuda:k`, one per GPU) or `cuda:K` (every worker on that GPU).
    pub device: String,
    /// Simulated hosts (`dev --simulate-hosts`): consecutive blocks of ranks, each host with its own
    /// address, host name, decode cache and mount of the dataset. Empty: every worker on 127.0.0.1.
    pub hosts: Vec<SimulatedHost>,
}

/// One simulated host of dev mode.
#[derive(Debug, Clone)]
pub struct SimulatedHost {
    pub name: String,
    /// The loopback address its workers listen on and advertise (127.0.0.2, 127.0.0.3, ...).
    pub ip: std::net::Ipv4Addr,
    /// Its decode cache (`SIMCLR_CACHE_DIR` of its workers).
    pub cache_dir: PathBuf,
    /// Where it mounts the dataset root the coordinator names: (the coordinator's root, this host's).
    pub data_mount: (PathBuf, PathBuf),
}

/// `count` simulated hosts under `dir` (`dir/host-K/cache`, `dir/host-K/data`, a link to `data_root`),
/// created here.
pub fn simulated_hosts(count: u32, dir: &Path, data_root: &Path) -> Result<Vec<SimulatedHost>, CoordinatorError> {
    if count > 250 {
        return Err(CoordinatorError::Config(format!("--simulate-hosts {count}: at most 250 (127.0.0.2-251)")));
    }
    let io =
        |what: &Path, e: std::io::Error| CoordinatorError::Config(format!("simulated hosts: {}: {e}", what.display()));
    let data_root = std::path::absolute(data_root).map_err(|e| io(data_root, e))?;
    (0..count)
        .map(|k| {
            let home = dir.join(format!("host-{k}"));
            let cache_dir = home.join("cache");
            std::fs::create_dir_all(&cache_dir).map_err(|e| io(&cache_dir, e))?;
            let mount = home.join("data");
            if std::fs::read_link(&mount).ok().as_deref() != Some(data_root.as_path()) {
                let _ = std::fs::remove_file(&mount);
                std::os::unix::fs::symlink(&data_root, &mount).map_err(|e| io(&mount, e))?;
            }
            let mount = std::path::absolute(&mount).map_err(|e| io(&mount, e))?;
            Ok(SimulatedHost {
                name: format!("host-{k}"),
                ip: std::net::Ipv4Addr::new(127, 0, 0, 2 + k as u8),
                cache_dir: std::path::absolute(&cache_dir).map_err(|e| io(&cache_dir, e))?,
                data_mount: (data_root.clone(), mount),
            })
        })
        .collect()
}

impl LaunchOptions {
    /// The simulated host of the worker of `rank` (consecutive blocks of ranks), if any.
    pub fn host_of(&self, rank: u32) -> Option<&SimulatedHost> {
        let hosts = self.hosts.len() as u64;
        (hosts > 0).then(|| &self.hosts[(u64::from(rank) * hosts / u64::from(self.workers.max(1))) as usize])
    }

    /// The `--device` of the worker of `rank`.
    pub fn worker_device(&self, rank: u32) -> String {
        if self.device == "cuda" {
            format!("cuda:{rank}")
        } else {
            self.device.clone()
        }
    }
}

/// How a spawned worker ended.
#[derive(Debug, Clone)]
pub struct WorkerExit {
    pub rank: u32,
    pub pid: u32,
    pub status: Option<ProcessStatus>,
}

impl WorkerExit {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    pub fn describe(&self) -> String {
        match self.status {
            Some(s) => format!("rank {} (pid {}) exited with {s}", self.rank, self.pid),
            None => format!("rank {} (pid {}) could not be waited for", self.rank, self.pid),
        }
    }
}

pub struct LaunchedWorkers {
    pub pids: Vec<u32>,
    /// One message per worker, when it exits.
    exits: mpsc::UnboundedReceiver<WorkerExit>,
    exited: Vec<u32>,
    remaining: usize,
}

/// Spawns `opts.workers` workers dialing `coordinator`.
pub fn spawn_workers(coordinator: SocketAddr, opts: &LaunchOptions) -> Result<LaunchedWorkers, CoordinatorError> {
    let (tx, exits) = mpsc::unbounded_channel();
    let mut pids = Vec::new();
    for rank in 0..opts.workers {
        let mut child = spawn_one(coordinator, rank, opts)?;
        let pid = child.id().unwrap_or_default();
        pids.push(pid);
        let prefix = (opts.log_format != "json").then(|| format!("[rank {rank}] "));
        if let Some(out) = child.stdout.take() {
            tokio::spawn(forward_lines(out, prefix.clone(), false));
        }
        if let Some(err) = child.stderr.take() {
            tokio::spawn(forward_lines(err, prefix, true));
        }
        let tx = tx.clone();
        tokio::spawn(async move {
            let status = child.wait().await.ok();
            let _ = tx.send(WorkerExit { rank, pid, status });
        });
    }
    Ok(LaunchedWorkers { remaining: pids.len(), pids, exits, exited: Vec::new() })
}

fn spawn_one(coordinator: SocketAddr, rank: u32, opts: &LaunchOptions) -> Result<Child, CoordinatorError> {
    let mut cmd = Command::new(&opts.worker_binary);
    // The workers' places come from this launcher, not from one that may have started the coordinator.
    for variable in simclr_common::launch_env::LAUNCHER_VARIABLES {
        cmd.env_remove(variable);
    }
    cmd.arg("--coordinator")
        .arg(format!("http://{coordinator}"))
        .args(["--rank", &rank.to_string(), "--world-size", &opts.workers.to_string()])
        .args(["--device", &opts.worker_device(rank), "--log-format", &opts.log_format])
        .args(&opts.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .process_group(0);
    match opts.host_of(rank) {
        Some(host) => {
            let (from, to) = &host.data_mount;
            cmd.args(["--peer-listen", &format!("{}:0", host.ip), "--host-name", &host.name])
                .arg("--data-mount")
                .arg(format!("{}={}", from.display(), to.display()))
                .env("SIMCLR_CACHE_DIR", &host.cache_dir);
        }
        None => {
            cmd.args(["--peer-listen", "127.0.0.1:0"]);
        }
    }
    // The workers share this machine's cores: each gets its share for libtorch's intra-op threads,
    // unless the user chose (SIMCLR_THREADS in the environment).
    if std::env::var_os("SIMCLR_THREADS").is_none() {
        let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        cmd.env("SIMCLR_THREADS", (cores / opts.workers.max(1) as usize).max(1).to_string());
    }
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn().map_err(|source| CoordinatorError::Spawn { binary: display(&opts.worker_binary), source })
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

async fn forward_lines(stream: impl AsyncRead + Unpin, prefix: Option<String>, to_stderr: bool) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let line = match &prefix {
            Some(p) => format!("{p}{line}"),
            None => line,
        };
        if to_stderr {
            simclr_common::logging::eprint_line(&line);
        } else {
            println!("{line}");
        }
    }
}

impl LaunchedWorkers {
    /// Next worker exit, or `None` once every worker has been reported.
    pub async fn next_exit(&mut self) -> Option<WorkerExit> {
        if self.remaining == 0 {
            return None;
        }
        let exit = self.exits.recv().await;
        if let Some(e) = &exit {
            self.remaining -= 1;
            self.exited.push(e.pid);
        }
        exit
    }

    /// Waits up to `grace` for the remaining workers, then SIGTERMs them, then SIGKILLs what is left.
    pub async fn shut_down(mut self, grace: Duration) -> Vec<WorkerExit> {
        let mut exits = Vec::new();
        for (signal, wait) in [
            (None, grace),
            (Some(libc::SIGTERM), Duration::from_secs(3)),
            (Some(libc::SIGKILL), Duration::from_secs(3)),
        ] {
            if self.remaining == 0 {
                break;
            }
            if let Some(signal) = signal {
                for &pid in self.pids.iter().filter(|p| !self.exited.contains(p)) {
                    tracing::warn!(pid, signal, "worker still running; signalling it");
                    // SAFETY: plain syscall; the pid is our own child, not yet reaped.
                    unsafe { libc::kill(pid as i32, signal) };
                }
            }
            let deadline = tokio::time::Instant::now() + wait;
            while self.remaining > 0 {
                match tokio::time::timeout_at(deadline, self.next_exit()).await {
                    Ok(Some(exit)) => exits.push(exit),
                    Ok(None) | Err(_) => break,
                }
            }
        }
        exits
    }
}
