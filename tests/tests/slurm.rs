//! `deploy/slurm/simclr.sbatch` submitted to a real SLURM: the one-node cluster `scripts/slurm_local.sh`
//! starts (`.ci/run` does, and sets `SIMCLR_EXPECT_SLURM=1` so that a missing SLURM fails the test
//! instead of skipping it). The job runs 2 CPU worker tasks (`--gpus-per-task=1` on the stand-in GPUs of
//! that cluster) on a small synthetic dataset, is preempted with SIGUSR1 once it has written a
//! checkpoint, requeues itself, resumes from that checkpoint and completes with its results.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use simclr_tests::binaries_dir;

/// Pretraining long enough (60 epochs of 6 tiny images per step, some seconds) that the preemption
/// lands in the middle of it, with a checkpoint every 2 steps; then a small sweep.
const JOB: &str = "[job]\nid = \"slurm-test\"\n[data]\nsynthetic_studies = 40\nsynthetic_size = 64\n\
[pretrain]\narch = \"tiny\"\nhead_out = 8\ninput_size = 32\nbatch_size = 6\nepochs = 60\ncheckpoint_every = 2\n\
[probe]\nhidden = [8]\nepochs = [5]\nseeds = 2\nbootstrap = 20\n";

const JOB_TIMEOUT: Duration = Duration::from_secs(300);

fn sbatch_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm/simclr.sbatch")
}

/// Runs a SLURM client command; its stdout, or an error with its stderr.
fn slurm(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}: {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether a SLURM controller answers here; `Err` when one is expected but absent.
fn slurm_available() -> Result<bool> {
    let expected = std::env::var("SIMCLR_EXPECT_SLURM").is_ok_and(|v| v == "1");
    match slurm("sinfo", &["-h", "-o", "%t"]) {
        // Busy with another test's job ("alloc", "comp") is fine: ours queues behind it.
        Ok(states) if states.lines().any(|s| ["idle", "mix", "alloc", "comp"].contains(&s.trim())) => Ok(true),
        Ok(states) if expected => bail!("SLURM answers but no node is idle: {states}"),
        Err(e) if expected => bail!("SIMCLR_EXPECT_SLURM=1 but no SLURM answers: {e:#} (scripts/slurm_local.sh start)"),
        _ => {
            eprintln!("skipped: no SLURM here (scripts/slurm_local.sh start, then export its SLURM_CONF)");
            Ok(false)
        }
    }
}

/// `JobState` and `Restarts` of job `id` as `scontrol show job` reports them.
fn job_state(id: &str) -> Result<(String, u32)> {
    let text = slurm("scontrol", &["show", "job", id, "-o"])?;
    let field =
        |name: &str| text.split_whitespace().find_map(|f| f.strip_prefix(name).map(str::to_string)).unwrap_or_default();
    Ok((field("JobState="), field("Restarts=").parse().unwrap_or(0)))
}

/// Cancels the job when the test ends early, so a failed test leaves no job holding the node.
struct CancelOnDrop(String);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("scancel").arg(&self.0).status();
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Everything the job wrote, for a failure message.
fn job_logs(submit_dir: &Path, run_dir: &Path, id: &str) -> String {
    let mut text = read(&submit_dir.join(format!("slurm-simclr-{id}.out")));
    if let Ok(entries) = std::fs::read_dir(run_dir.join("logs")) {
        for entry in entries.flatten() {
            let log = read(&entry.path());
            let tail: Vec<_> = log.lines().rev().take(15).collect();
            text += &format!("\n== {} (tail)\n", entry.path().display());
            text += &tail.into_iter().rev().collect::<Vec<_>>().join("\n");
        }
    }
    text
}

/// Submits the sbatch script from `submit_dir` with 2 worker tasks of one CPU (the script's GPU
/// directives stay: one stand-in GPU per task); the job id.
fn submit(submit_dir: &Path) -> Result<String> {
    std::fs::write(submit_dir.join("job.toml"), JOB)?;
    let out = Command::new("sbatch")
        .current_dir(submit_dir)
        .env("SIMCLR_BIN", binaries_dir()?)
        .args(["--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", "--time=10"])
        .arg(sbatch_script())
        .arg("job.toml")
        .output()?;
    if !out.status.success() {
        bail!("sbatch failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or_default().to_string())
}

/// A job of the sbatch script, submitted from its own directory and cancelled when dropped.
struct Submitted {
    dir: tempfile::TempDir,
    id: String,
    run_dir: PathBuf,
    started: Instant,
    _cancel: CancelOnDrop,
}

impl Submitted {
    /// Submits the script (see `submit`); `None` (a skip) where no SLURM answers.
    fn new() -> Result<Option<Submitted>> {
        if !slurm_available()? {
            return Ok(None);
        }
        let dir = tempfile::tempdir()?;
        let id = submit(dir.path())?;
        let run_dir = dir.path().join(format!("runs/slurm-{id}"));
        Ok(Some(Submitted { _cancel: CancelOnDrop(id.clone()), dir, id, run_dir, started: Instant::now() }))
    }

    fn logs(&self) -> String {
        job_logs(self.dir.path(), &self.run_dir, &self.id)
    }

    fn batch_log(&self) -> String {
        read(&self.dir.path().join(format!("slurm-simclr-{}.out", self.id)))
    }

    /// Polls `ready` until it holds; an error naming `what` and showing the logs after `JOB_TIMEOUT`.
    fn wait_until(&self, what: &str, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
        while !ready()? {
            if self.started.elapsed() > JOB_TIMEOUT {
                bail!("job {}: {what} not within {JOB_TIMEOUT:?}:\n{}", self.id, self.logs());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Polls the job until it reaches one of SLURM's final states; (state, restarts).
    fn wait_final(&self) -> Result<(String, u32)> {
        let mut last = (String::new(), 0);
        self.wait_until("a final state", || {
            last = job_state(&self.id)?;
            Ok(["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"].contains(&last.0.as_str()))
        })?;
        Ok(last)
    }
}

#[test]
fn the_sbatch_script_runs_a_preempted_job_to_completion_on_a_real_slurm() -> Result<()> {
    let Some(job) = Submitted::new()? else { return Ok(()) };
    let (id, run_dir) = (&job.id, &job.run_dir);

    // Preempt once the first checkpoint exists: SIGUSR1 to the batch script, as --signal=B:USR1 sends
    // it before the time limit.
    job.wait_until("the first checkpoint", || Ok(run_dir.join("checkpoints/latest").is_file()))?;
    slurm("scancel", &["--signal=USR1", "--batch", id])?;

    // The job comes back as pending with one restart. SLURM holds a requeued job for a while before it
    // may start again; an operator's `StartTime=now` lifts that, and keeps the test short. Not at
    // once: slurmd refuses to relaunch a job in the same second its old credential was revoked
    // ("Job credential revoked", seen when the release came 0.1 s after the requeue).
    let mut pending_since: Option<Instant> = None;
    job.wait_until("the requeue", || {
        let (state, restarts) = job_state(id)?;
        if restarts == 1 && state == "PENDING" {
            if pending_since.get_or_insert_with(Instant::now).elapsed() < Duration::from_secs(3) {
                return Ok(false);
            }
            slurm("scontrol", &["update", &format!("JobId={id}"), "StartTime=now"])?;
            return Ok(true);
        }
        if restarts == 1 || state != "RUNNING" {
            bail!("job {id} {state} after {restarts} restarts:\n{}", job.logs());
        }
        Ok(false)
    })?;
    let state = job.wait_final()?;
    let logs = job.logs();
    assert_eq!(state, ("COMPLETED".to_string(), 1), "{logs}");

    let batch = job.batch_log();
    assert!(batch.contains("SIGUSR1 received") && batch.contains(&format!("job {id} requeued")), "{batch}");
    assert!(batch.contains("(restart 1)") && batch.contains("coordinator exited with status 0"), "{batch}");
    // One log per rank, appended to across the requeue; the second run resumed from a checkpoint.
    let workers: Vec<String> = (0..2).map(|rank| read(&run_dir.join(format!("logs/worker-{rank}.log")))).collect();
    for (rank, log) in workers.iter().enumerate() {
        assert!(log.contains(&format!("rank={rank}")), "worker-{rank}.log does not name its rank:\n{logs}");
    }
    assert!(workers.iter().any(|l| l.contains("resuming from the latest checkpoint")), "{logs}");
    let coordinator = read(&run_dir.join("logs/coordinator.log"));
    assert!(coordinator.contains("source=SLURM_JOB_ID"), "{coordinator}");
    assert!(coordinator.contains("all 2 ranks finished"), "{coordinator}");
    // The results: one row per task, each task once (2 encoders x 3 probes (linear, 8 hidden with and
    // without dropout) x 2 seeds).
    let results = read(&run_dir.join("results.csv"));
    let mut tasks: Vec<u32> = results.lines().skip(1).filter_map(|l| l.split(',').next()?.parse().ok()).collect();
    tasks.sort_unstable();
    assert_eq!(tasks, (0..12).collect::<Vec<_>>(), "{results}");
    assert!(run_dir.join("encoder.safetensors").is_file());
    Ok(())
}

#[test]
fn a_cancelled_job_stops_without_a_requeue() -> Result<()> {
    let Some(job) = Submitted::new()? else { return Ok(()) };
    // Cancel once the job runs (the script has started the coordinator and the workers).
    job.wait_until("the start", || Ok(job.batch_log().contains("coordinator on")))?;
    slurm("scancel", &[&job.id])?;
    let state = job.wait_final()?;
    let logs = job.logs();
    assert_eq!(state, ("CANCELLED".to_string(), 0), "{logs}");
    // SLURM's SIGTERM reached the script, which did not requeue the job it was cancelling.
    assert!(logs.contains("without a requeue") && !logs.contains("requeued"), "{logs}");
    Ok(())
}

/// A worker task killed (SIGKILL) during pretraining: the coordinator restarts the job from its last
/// checkpoint and the script starts the worker step again; the job completes without a requeue.
#[test]
fn a_killed_worker_task_is_started_again_and_the_job_completes() -> Result<()> {
    let Some(job) = Submitted::new()? else { return Ok(()) };
    let run_dir = &job.run_dir;
    job.wait_until("the first checkpoint", || Ok(run_dir.join("checkpoints/latest").is_file()))?;
    let cluster: serde_json::Value = serde_json::from_str(&read(&run_dir.join("cluster.json")))?;
    let pid = cluster["ranks"][1]["pid"].as_i64().context("no pid of rank 1 in cluster.json")?;
    // SAFETY: plain syscall; the task runs on this machine (a one-node cluster).
    anyhow::ensure!(unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0, "cannot kill pid {pid}");
    let state = job.wait_final()?;
    let logs = job.logs();
    assert_eq!(state, ("COMPLETED".to_string(), 0), "{logs}");
    assert!(job.batch_log().contains("starting the workers again"), "{logs}");
    let coordinator = read(&run_dir.join("logs/coordinator.log"));
    assert!(coordinator.contains("restarting from the last checkpoint (restart 1 of 3)"), "{coordinator}");
    assert!(coordinator.contains("all 2 ranks finished"), "{coordinator}");
    let worker = read(&run_dir.join("logs/worker-1.log"));
    assert!(worker.contains("resuming from the latest checkpoint"), "{logs}");
    let results = read(&run_dir.join("results.csv"));
    assert_eq!(results.lines().count(), 13, "{results}");
    Ok(())
}
