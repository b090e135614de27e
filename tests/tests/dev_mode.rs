//! `simclr-coordinator dev`: the real binary spawning real workers, end to end, and its tear-down.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use simclr_common::ExitStatus;
use simclr_tests::{binaries_dir, eventually, exit_code};
use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::process::Command;

const GENEROUS: Duration = Duration::from_secs(120);

/// A small synthetic dataset and a tiny encoder keep each test to a few seconds.
const SMALL_DATA: &str = "[data]\nsynthetic_studies = 24\nsynthetic_size = 64\n";
/// Pretraining sized for tests: a few thousand parameters, 32x32 inputs, 6 images per step (a
/// multiple of 2 and 3 workers), checkpoints every 2 steps; and a probe sweep of 12 tasks (an MLP with
/// and without dropout and a linear probe, 2 seeds, pretrained and random encoder).
const TINY_PRETRAIN: &str = "[pretrain]\narch = \"tiny\"\nhead_out = 8\ninput_size = 32\nbatch_size = 6\nepochs = 2\ncheckpoint_every = 2\n[probe]\nhidden = [8]\nepochs = [5]\nseeds = 2\nbootstrap = 20\n";

fn dev_command(run_dir: &Path, extra: &[&str]) -> anyhow::Result<Command> {
    let mut cmd = Command::new(binaries_dir()?.join("simclr-coordinator"));
    // The synthetic dataset is generated into a cache beside the run directory, not the user's.
    let cache = run_dir.parent().unwrap_or(run_dir).join("cache");
    cmd.arg("dev")
        .arg("--run-dir")
        .arg(run_dir)
        .args(extra)
        .env("SIMCLR_CACHE_DIR", cache)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    Ok(cmd)
}

fn write_config(dir: &Path, body: &str) -> anyhow::Result<String> {
    let path = dir.join("job.toml");
    std::fs::write(&path, body)?;
    Ok(path.display().to_string())
}

const FAST_AND_LONG: &str = "[data]\nsynthetic_studies = 24\nsynthetic_size = 64\n[cluster]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1500\npeer_timeout_ms = 500\nshutdown_grace_ms = 3000\n[preflight]\nrounds = 1000000\ninterval_ms = 20\n[pretrain]\nenabled = false\n";

fn pid_alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// Waits until cluster.json appears and returns the workers' pids.
async fn worker_pids(run_dir: &Path) -> anyhow::Result<Vec<u32>> {
    let path = run_dir.join("cluster.json");
    anyhow::ensure!(eventually(GENEROUS, || path.is_file()).await, "no cluster.json in {}", run_dir.display());
    let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    Ok(doc["ranks"].as_array().unwrap().iter().map(|r| r["pid"].as_u64().unwrap() as u32).collect())
}

/// Waits for the coordinator to exit; returns its exit code and its stderr followed by its stdout.
async fn finish(mut child: tokio::process::Child) -> anyhow::Result<(i32, String)> {
    let mut stderr = child.stderr.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (mut text, mut out) = (String::new(), String::new());
    let read = async {
        let (e, o) = tokio::join!(stderr.read_to_string(&mut text), stdout.read_to_string(&mut out));
        e?;
        o?;
        child.wait().await
    };
    let status = tokio::time::timeout(GENEROUS, read).await??;
    Ok((exit_code(status), text + &out))
}

/// The sweep's results.json: every task of the grid exactly once. Returns the ranks that ran them.
fn check_sweep_results(run_dir: &Path, tasks: usize, columns: usize) -> anyhow::Result<Vec<u64>> {
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("results.json"))?)?;
    let rows = results.as_array().expect("results.json is a list");
    let ids: Vec<u64> = rows.iter().map(|r| r["task"]["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, (0..tasks as u64).collect::<Vec<_>>(), "every task exactly once, in order");
    for row in rows {
        let classes = row["classes"].as_array().unwrap();
        assert_eq!(classes.len(), columns, "{row}");
        let accuracy = classes[0]["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{row}");
        assert!(!row["curves"].as_array().unwrap().is_empty(), "{row}");
    }
    for file in ["results.csv", "results.md"] {
        assert!(run_dir.join(file).is_file(), "{file} missing");
    }
    Ok(rows.iter().map(|r| r["rank"].as_u64().unwrap()).collect())
}

/// Tag -> [(step, value)].
type Scalars = BTreeMap<String, Vec<(i64, f64)>>;

/// The run's TensorBoard scalars as TensorBoard's own reader (`EventAccumulator`, from the `tensorboard`
/// package the test set-up installs) loads them: tag -> [(step, value)]. `None` without Python or that
/// package (a failure where scripts/test.sh's set-up should have installed it).
fn tensorboard_scalars(run_dir: &Path) -> anyhow::Result<Option<Scalars>> {
    let script = "import sys, json\n\
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        acc = EventAccumulator(sys.argv[1], size_guidance={'scalars': 0})\n\
        acc.Reload()\n\
        print(json.dumps({t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()['scalars']}))";
    let dir = run_dir.join("tensorboard");
    let Some(out) = simclr_tests::run_python("tensorboard", script, &[dir.as_os_str()], &[])? else {
        return Ok(None);
    };
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(out.status.success(), "TensorBoard could not read {}: {stderr}", dir.display());
    Ok(Some(serde_json::from_slice(&out.stdout)?))
}

/// The event files hold rank 0's pretraining metrics and every probe task's curves and AUC, the same
/// numbers results.json has.
fn check_tensorboard(run_dir: &Path, pretrain_steps: f64) -> anyhow::Result<()> {
    let Some(scalars) = tensorboard_scalars(run_dir)? else { return Ok(()) };
    let tags: Vec<&String> = scalars.keys().collect();
    for name in ["loss", "contrastive_accuracy", "lr", "images_per_s", "comm_s"] {
        let points =
            scalars.get(&format!("pretrain/{name}")).ok_or_else(|| anyhow::anyhow!("no pretrain/{name}: {tags:?}"))?;
        assert!(
            !points.is_empty() && points.iter().all(|(step, v)| *step as f64 <= pretrain_steps && v.is_finite()),
            "{points:?}"
        );
    }
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("results.json"))?)?;
    for row in results.as_array().unwrap() {
        let task: simclr_common::probe::ProbeTask = serde_json::from_value(row["task"].clone())?;
        let prefix =
            format!("probe/{}/{}/seed {}", row["task"]["encoder"].as_str().unwrap(), task.configuration(), task.seed);
        let curves = row["curves"].as_array().unwrap();
        let accuracy = &scalars[&format!("{prefix}/test_accuracy")];
        assert_eq!(accuracy.len(), curves.len(), "{prefix}");
        let last = curves.last().unwrap();
        assert_eq!(accuracy.last().unwrap().0, last["epoch"].as_i64().unwrap());
        assert!((accuracy.last().unwrap().1 - last["test_accuracy"].as_f64().unwrap()).abs() < 1e-6, "{prefix}");
        if let Some(auc) = row["classes"][0]["auc"].as_f64() {
            let logged = scalars[&format!("{prefix}/test_auc")][0].1;
            assert!((logged - auc).abs() < 1e-6, "{prefix}: {logged} vs {auc}");
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_runs_the_job_end_to_end_with_rank_prefixed_logs() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    // The sweep also fine-tunes (the encoder's last stage): 12 frozen and 12 fine-tuned probes.
    let body = format!("{SMALL_DATA}{TINY_PRETRAIN}finetune = true\nfinetune_blocks = 1\n");
    let config = write_config(dir.path(), &body)?;
    let child = dev_command(&run_dir, &["--workers", "3", "--seed", "11", "--config", &config])?.spawn()?;
    let (code, log) = finish(child).await?;
    assert_eq!(code, 0, "{log}");
    for rank in 0..3 {
        assert!(log.contains(&format!("[rank {rank}] ")), "no log lines of rank {rank}:\n{log}");
    }
    for file in [
        "config.toml",
        "cluster.json",
        "preflight.json",
        "summary.json",
        "dataset.json",
        "split.csv",
        "data_issues.csv",
        "pretrain.json",
        "checkpoint.json",
        "encoder.safetensors",
        "probe.json",
        "embeddings.safetensors",
        "embeddings.csv",
        "plots/embeddings.png",
        "plots/embeddings.svg",
        "monitor.csv",
        "plots/monitor.png",
    ] {
        assert!(run_dir.join(file).is_file(), "{file} missing");
    }
    let config = simclr_common::JobConfig::from_file(&run_dir.join("config.toml"))?;
    assert_eq!((config.cluster.world_size, config.job.seed), (3, 11));
    // The synthetic dataset was generated, indexed and split at study level.
    let dataset: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("dataset.json"))?)?;
    assert_eq!((dataset["synthetic"].as_bool(), dataset["studies"].as_u64()), (Some(true), Some(24)), "{dataset}");
    assert_eq!(dataset["unusable_files"], 0);
    let split = &dataset["split"];
    let studies = |side: &str| split[side]["studies"].as_u64().unwrap();
    assert_eq!(studies("train") + studies("validation") + studies("test"), 24, "{split}");
    assert!(studies("validation") > 0 && studies("test") > 0, "{split}");
    // Between them the ranks decoded every image the job reads, once: each training image and each
    // validation and test image.
    let decode: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("decode.json"))?)?;
    let decoded: f64 = (0..3).map(|r| decode["ranks"][r.to_string()]["images"].as_f64().unwrap()).sum();
    let images = |side: &str| split[side]["images"].as_u64().unwrap();
    assert_eq!(decoded as u64, images("train") + images("validation") + images("test"), "{decode}");
    // The embeddings: one row per image of every split, gathered from the 3 ranks, each image once,
    // with its split as the split file says.
    let rows = csv_rows(&run_dir.join("embeddings.csv"))?;
    assert_eq!(rows.len() as u64, images("train") + images("validation") + images("test"));
    let uids: std::collections::BTreeSet<&str> = rows.iter().map(|r| &r[1]).collect();
    assert_eq!(uids.len(), rows.len(), "an image twice in embeddings.csv");
    for side in ["train", "validation", "test"] {
        assert_eq!(rows.iter().filter(|r| &r[4] == side).count() as u64, images(side), "{side}");
    }
    let tensors = read_tensors(&run_dir.join("embeddings.safetensors"))?;
    assert_eq!(tensors["features"].len(), rows.len() * 16, "tiny encoder: 16 features a row");
    assert_eq!(tensors["projection"].len(), rows.len() * 2);
    // Every rank pretrained in lockstep to the same end; rank 0 checkpointed, the coordinator recorded it.
    let pretrain: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("pretrain.json"))?)?;
    let rank0 = &pretrain["ranks"]["0"];
    let steps = rank0["steps"].as_f64().unwrap();
    // The kNN monitor looked at the last epoch (every_epochs = 5 by default, and always the last).
    let knn = rank0["knn_auc"].as_f64().unwrap_or(f64::NAN);
    assert!((0.0..=1.0).contains(&knn), "{pretrain}");
    let looks = csv_rows(&run_dir.join("monitor.csv"))?;
    assert_eq!(looks.len(), 1, "one look: the last epoch");
    assert_eq!((&looks[0][0], looks[0][1].parse::<f64>()?), ("2", steps));
    assert!(steps >= 2.0, "{pretrain}");
    for r in 0..3 {
        let ranks = &pretrain["ranks"][r.to_string()];
        assert_eq!(ranks["steps"].as_f64(), Some(steps), "{pretrain}");
        assert_eq!(ranks["final_loss"], rank0["final_loss"], "ranks disagree on the global loss: {pretrain}");
        assert_eq!(ranks["world_size"].as_f64(), Some(3.0));
    }
    let checkpoint: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("checkpoint.json"))?)?;
    let latest = std::fs::read_to_string(run_dir.join("checkpoints/latest"))?;
    assert!(checkpoint["path"].as_str().unwrap().ends_with(latest.trim()), "{checkpoint} vs {latest}");
    assert!(run_dir.join("checkpoints").join(latest.trim()).join("encoder.safetensors").is_file());
    // The sweep: 24 tasks, each reported once, the table printed at the end (on stdout).
    check_sweep_results(&run_dir, 24, 1)?;
    assert!(
        log.contains("| hidden nodes | dropout | epochs | train accuracy | validation AUC | test accuracy |"),
        "{log}"
    );
    let probe: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("probe.json"))?)?;
    let labelled = split["train"]["images"].as_f64().unwrap();
    for r in 0..3 {
        // Every rank holds every training image's features, and all of them ran tasks between them.
        assert_eq!(probe["ranks"][r.to_string()]["train_images"].as_f64(), Some(labelled), "{probe}");
    }
    let tasks: f64 = (0..3).map(|r| probe["ranks"][r.to_string()]["tasks"].as_f64().unwrap()).sum();
    assert_eq!(tasks, 24.0, "{probe}");
    let table = std::fs::read_to_string(run_dir.join("results.md"))?;
    assert!(table.contains("| 8 (fine-tuned) |") && table.contains("| linear (fine-tuned) |"), "{table}");
    check_tensorboard(&run_dir, steps)?;
    for pid in worker_pids(&run_dir).await? {
        assert!(!pid_alive(pid), "worker {pid} outlived the coordinator");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctrl_c_on_dev_mode_stops_every_worker_and_leaves_no_orphan() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    let config = write_config(dir.path(), FAST_AND_LONG)?;
    let child = dev_command(&run_dir, &["--workers", "2", "--config", &config])?.spawn()?;
    let pids = worker_pids(&run_dir).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // SAFETY: plain syscall on our own child.
    unsafe { libc::kill(child.id().unwrap() as i32, libc::SIGINT) };
    let (code, log) = finish(child).await?;
    assert_eq!(code, ExitStatus::Interrupted(libc::SIGINT).code(), "{log}");
    assert!(log.contains("coordinator received SIGINT"), "{log}");
    for pid in pids {
        assert!(eventually(Duration::from_secs(5), || !pid_alive(pid)).await, "worker {pid} left behind");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_in_dev_mode_stops_the_job_at_once() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    let config = write_config(dir.path(), FAST_AND_LONG)?;
    let child = dev_command(&run_dir, &["--workers", "3", "--config", &config, "--max-restarts", "0"])?.spawn()?;
    let pids = worker_pids(&run_dir).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed_at = Instant::now();
    // SAFETY: plain syscall on a worker the coordinator spawned.
    unsafe { libc::kill(pids[2] as i32, libc::SIGKILL) };
    let (code, log) = finish(child).await?;
    assert_eq!(code, ExitStatus::JobAborted.code(), "{log}");
    assert!(log.contains("rank 2"), "the failure does not name rank 2:\n{log}");
    assert!(log.contains("no restarts left (cluster.max_restarts = 0)"), "{log}");
    assert!(killed_at.elapsed() < GENEROUS);
    for pid in pids {
        assert!(!pid_alive(pid), "worker {pid} left behind");
    }
    let summary: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json"))?)?;
    assert_eq!(summary["success"], false);
    Ok(())
}

/// Appends the lines of `lines` to `log` until one contains `pattern` (true) or the stream ends (false).
async fn read_until(
    lines: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>,
    log: &mut String,
    pattern: Option<&str>,
) -> anyhow::Result<bool> {
    while let Some(line) = lines.next_line().await? {
        log.push_str(&line);
        log.push('\n');
        if pattern.is_some_and(|p| line.contains(p)) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// A worker killed (SIGKILL) in the middle of the probe sweep costs only its running task: the
/// coordinator hands it to another rank, the job completes, and every task is reported exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_the_probe_sweep_loses_no_task() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    // 8 tasks of a few hundred probe epochs each, so that the sweep outlasts the kill.
    let body = format!(
        "{SMALL_DATA}{}[cluster]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1500\n\
         [probe]\nhidden = [16]\ndropout = [0.0]\nepochs = [600]\nlinear = false\nseeds = 4\nbootstrap = 0\n",
        TINY_PRETRAIN.split("[probe]").next().unwrap().replace("epochs = 2", "epochs = 1")
    );
    let config = write_config(dir.path(), &body)?;
    // The coordinator's debug line for each task handed out tells which rank holds a task.
    let mut child = dev_command(&run_dir, &["--workers", "3", "--config", &config])?
        .env("RUST_LOG", "info,simclr_coordinator::job=debug")
        .spawn()?;
    let pids = worker_pids(&run_dir).await?;
    let mut stdout = child.stdout.take().unwrap();
    let stdout = tokio::spawn(async move {
        let mut out = String::new();
        stdout.read_to_string(&mut out).await.map(|_| out)
    });
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let started = tokio::time::timeout(GENEROUS, read_until(&mut lines, &mut log, Some("probe 1/8"))).await??;
    assert!(started, "the sweep never reported a result:\n{log}");
    // Kill the rank that reported first once it holds its next task (which takes it hundreds of
    // milliseconds): that task must go back to the queue.
    let victim: usize = log
        .lines()
        .find(|l| l.contains("probe 1/8"))
        .and_then(|l| l.rsplit("rank=").next())
        .and_then(|r| r.trim().split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no rank in the first result's line:\n{log}"))?;
    loop {
        let mut line = String::new();
        let found =
            tokio::time::timeout(GENEROUS, read_until(&mut lines, &mut line, Some("probe task handed out"))).await??;
        log.push_str(&line);
        assert!(found, "rank {victim} got no second task:\n{log}");
        if line.contains(&format!("rank={victim} ")) {
            break;
        }
    }
    // SAFETY: plain syscall on a worker the coordinator spawned.
    unsafe { libc::kill(pids[victim] as i32, libc::SIGKILL) };
    tokio::time::timeout(GENEROUS, read_until(&mut lines, &mut log, None)).await??;
    let status = tokio::time::timeout(GENEROUS, child.wait()).await??;
    let log = log + &stdout.await??;
    assert_eq!(exit_code(status), 0, "{log}");
    // The victim was running a task when it died: that task went back to the queue.
    assert!(log.contains("requeued=1") && log.contains("the probe sweep goes on without the lost rank"), "{log}");
    assert!(log.contains(&format!("rank {victim} lost during the probe sweep")), "{log}");
    let ranks = check_sweep_results(&run_dir, 8, 1)?;
    assert!(ranks.iter().filter(|&&r| r != victim as u64).count() >= 7, "{ranks:?}");
    for pid in pids {
        assert!(eventually(Duration::from_secs(5), || !pid_alive(pid)).await, "worker {pid} left behind");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_flag_or_config_key_exits_2_naming_it() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), "[cluster]\nworld_sise = 3\n")?;
    let child = dev_command(&dir.path().join("run"), &["--config", &config])?.spawn()?;
    let (code, log) = finish(child).await?;
    assert_eq!(code, ExitStatus::Usage.code(), "{log}");
    assert!(log.contains("world_sise") && log.contains("job.toml"), "{log}");

    let child = dev_command(&dir.path().join("run"), &["--workers", "many"])?.spawn()?;
    let (code, log) = finish(child).await?;
    assert_eq!(code, ExitStatus::Usage.code(), "{log}");
    assert!(log.contains("--workers"), "{log}");
    Ok(())
}

/// Workers limited to a data root (`SIMCLR_DATA_ROOT`, as `--data-root`) that does not hold the job's
/// dataset refuse their assignment: the job stops at once with the reason, reading nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_refuse_a_dataset_outside_their_data_root() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &format!("{SMALL_DATA}{TINY_PRETRAIN}"))?;
    let allowed = dir.path().join("allowed");
    let mut cmd = dev_command(&dir.path().join("run"), &["--workers", "2", "--config", &config])?;
    let child = cmd.env("SIMCLR_DATA_ROOT", &allowed).spawn()?;
    let (code, log) = finish(child).await?;
    assert_ne!(code, 0, "{log}");
    let reason = format!("outside this worker's --data-root {}", allowed.display());
    assert!(log.contains(&reason), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    Ok(())
}

/// NCCL asked for on CPU workers: the job stops with an error that names the backend and the device,
/// it does not hang and nothing panics (on every host, with or without CUDA libraries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nccl_on_cpu_workers_is_refused_by_name() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &format!("{SMALL_DATA}{TINY_PRETRAIN}"))?;
    let run_dir = dir.path().join("run");
    let child = dev_command(&run_dir, &["--workers", "2", "--config", &config, "--collective", "nccl"])?.spawn()?;
    let (code, log) = finish(child).await?;
    assert_eq!(code, ExitStatus::JobAborted.code(), "{log}");
    assert!(log.contains("cluster.collective = nccl") && log.contains("runs on cpu"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    let effective = std::fs::read_to_string(run_dir.join("config.toml"))?;
    assert!(effective.contains("collective = \"nccl\""), "{effective}");
    Ok(())
}

/// A messy export folder, as a PACS export or a shared drive holds it.
struct MessyFolder {
    root: std::path::PathBuf,
    /// What the index must refuse: path relative to the root -> kind.
    refused: BTreeMap<String, &'static str>,
    /// The one file whose header is sound but whose pixels do not decode (only a worker can find it).
    undecodable: String,
}

/// Synthetic studies labelled per image in a plain `labels.csv`, one multi-image study whose rows
/// disagree, the codec fixtures (GDCM, pydicom), colour files and a data set without File Meta
/// (pydicom, GDCM), a text file named `.dcm`, a file whose pixel data was cut short, and a JPEG whose
/// headers are intact but whose scan is gone.
fn messy_folder(dir: &Path) -> anyhow::Result<MessyFolder> {
    let root = dir.join("export");
    let status = std::process::Command::new(binaries_dir()?.join("simclr-coordinator"))
        .args(["synth", "--studies", "24", "--size", "32", "--out"])
        .arg(&root)
        .env("RUST_LOG", "warn")
        .status()?;
    assert!(status.success());
    // labels.csv, one row per image, from the SIIM study table (which then goes).
    let index = simclr_data::index::index_tree(&root, Default::default(), &|_, _| {})?;
    let simclr_data::labels::LabelTable::Siim { studies, columns, .. } = simclr_data::labels::LabelTable::load(&root)?
    else {
        anyhow::bail!("synth wrote no SIIM table");
    };
    let typical = columns.iter().position(|c| c == "Typical Appearance").unwrap();
    std::fs::remove_file(root.join(simclr_data::labels::SIIM_STUDY_CSV))?;
    let mut per_study: BTreeMap<&str, Vec<&simclr_data::index::ImageRecord>> = BTreeMap::new();
    for image in &index.images {
        per_study.entry(image.study_uid.as_str()).or_default().push(image);
    }
    let (disagreeing, images) =
        per_study.iter().find(|(_, images)| images.len() >= 2).expect("a synthetic study with several images");
    let mut refused = BTreeMap::new();
    let mut csv = format!("path,{}\n", columns.join(","));
    for image in &index.images {
        let mut values = studies[&image.study_uid].clone();
        if image.study_uid == *disagreeing {
            refused.insert(image.path.display().to_string(), "labels_disagree");
            if image.path == images[0].path {
                values[typical] = 1.0 - values[typical];
            }
        }
        let values: Vec<String> = values.iter().map(f32::to_string).collect();
        csv.push_str(&format!("{},{}\n", image.path.display(), values.join(",")));
    }
    std::fs::write(root.join("labels.csv"), csv)?;

    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tests/fixtures");
    for (folder, kind) in [("codecs", None), ("messy", Some("colour"))] {
        std::fs::create_dir_all(root.join(folder))?;
        for entry in std::fs::read_dir(fixtures.join(folder))? {
            let path = entry?.path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !name.ends_with(".dcm") || name == "jpeg_baseline_8bit.dcm" {
                continue;
            }
            std::fs::copy(&path, root.join(folder).join(&name))?;
            let kind = if name.contains("no_meta") {
                Some("no_file_meta")
            } else if name.contains("charset") {
                None // usable, with a parser warning
            } else {
                kind
            };
            if let Some(kind) = kind {
                refused.insert(format!("{folder}/{name}"), kind);
            }
        }
    }
    // Transcodes of one source keep its SOP Instance UID: the copies after the first are duplicates.
    for bad in simclr_data::index::index_tree(&root.join("codecs"), Default::default(), &|_, _| {})?.bad {
        assert_eq!(bad.kind, simclr_data::index::BadKind::Duplicate, "{bad:?}");
        refused.insert(format!("codecs/{}", bad.path.display()), "duplicate");
    }
    std::fs::write(root.join("train/broken.dcm"), b"DICM? no: a file cut short by a failed copy")?;
    refused.insert("train/broken.dcm".into(), "unreadable");
    // A real file whose pixel data was cut short: the index sees that the element overruns the file.
    let victim = index.images.iter().find(|i| i.study_uid != *disagreeing).unwrap().path.clone();
    let bytes = std::fs::read(root.join(&victim))?;
    std::fs::write(root.join(&victim), &bytes[..bytes.len() - 500])?;
    refused.insert(victim.display().to_string(), "unreadable");
    // A JPEG whose scan marker became an end-of-image marker: every header is sound, the frame is not.
    let mut jpeg = std::fs::read(fixtures.join("codecs/jpeg_baseline_8bit.dcm"))?;
    // Under a SOP Instance UID of its own (the same length, so every length field stays right).
    let single = dir.join("single");
    std::fs::create_dir_all(&single)?;
    std::fs::copy(fixtures.join("codecs/jpeg_baseline_8bit.dcm"), single.join("a.dcm"))?;
    let uid = simclr_data::index::index_tree(&single, Default::default(), &|_, _| {})?.images[0].sop_uid.clone();
    let mut own = uid.clone().into_bytes();
    let last = own.len() - 1;
    own[last] = if own[last] == b'1' { b'2' } else { b'1' };
    while let Some(at) = jpeg.windows(uid.len()).position(|w| w == uid.as_bytes()) {
        jpeg[at..at + uid.len()].copy_from_slice(&own);
    }
    let soi = jpeg.windows(2).position(|w| w == [0xFF, 0xD8]).unwrap();
    let sos = soi + jpeg[soi..].windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    jpeg[sos + 1] = 0xD9;
    std::fs::write(root.join("codecs/jpeg_baseline_no_scan.dcm"), jpeg)?;
    Ok(MessyFolder { root, refused, undecodable: "codecs/jpeg_baseline_no_scan.dcm".into() })
}

/// Rows of a run-directory CSV whose first column is not the header's.
fn csv_rows(path: &Path) -> anyhow::Result<Vec<csv::StringRecord>> {
    let mut reader = csv::Reader::from_path(path)?;
    Ok(reader.records().collect::<Result<_, _>>()?)
}

/// The messy folder: with `skip` the job runs to the end; `data_issues.csv` lists every file the index
/// could refuse exactly once, with its kind, and `inspect` prints the same list before any job; the
/// workers meet only the one file no header check could catch, once; `fail` stops before any worker
/// starts, naming the file; with only that file left, `fail` stops the job from the worker at once,
/// without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_messy_folder_runs_and_lists_each_unusable_file_once_with_its_reason() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let messy = messy_folder(dir.path())?;
    let data_arg = messy.root.display().to_string();

    let out = std::process::Command::new(binaries_dir()?.join("simclr-coordinator"))
        .args(["inspect", "--data", &data_arg])
        .env("RUST_LOG", "warn")
        .output()?;
    assert_eq!(out.status.code(), Some(ExitStatus::DataError.code()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let inspected: BTreeMap<String, String> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("unusable ("))
        .map(|l| {
            let (kind, rest) = l.split_once("): ").unwrap();
            (rest.split_once(": ").unwrap().0.to_string(), kind.to_string())
        })
        .collect();
    let want: BTreeMap<String, String> = messy.refused.iter().map(|(p, k)| (p.clone(), k.to_string())).collect();
    assert_eq!(inspected, want, "{stdout}");

    let run_dir = dir.path().join("skip");
    // (Multi-label probes here: all four SIIM classes, from labels.csv's four columns.)
    let body = format!("[data]\nmulti_label = true\n{}", TINY_PRETRAIN.replace("batch_size = 6", "batch_size = 4"));
    let config = write_config(dir.path(), &body)?;
    let child = dev_command(&run_dir, &["--workers", "2", "--data", &data_arg, "--config", &config])?.spawn()?;
    let (code, log) = finish(child).await?;
    assert_eq!(code, 0, "{log}");
    let listed: Vec<(String, String)> = csv_rows(&run_dir.join("data_issues.csv"))?
        .iter()
        .filter(|r| !matches!(&r[0], "parser_warning" | "image_without_label" | "label_without_image"))
        .map(|r| (r[1].to_string(), r[0].to_string()))
        .collect();
    assert_eq!(listed.iter().cloned().collect::<BTreeMap<_, _>>(), want, "{listed:?}");
    assert_eq!(listed.len(), want.len(), "a file listed twice: {listed:?}");
    let reasons = std::fs::read_to_string(run_dir.join("data_issues.csv"))?;
    assert!(reasons.contains("disagree on their labels") && reasons.contains("data.color"), "{reasons}");
    let worker_issues = csv_rows(&run_dir.join("worker_file_issues.csv"))?;
    let tried: Vec<&str> = worker_issues.iter().map(|r| &r[2]).collect();
    assert_eq!(tried, [messy.undecodable.as_str()], "workers met files the index could have refused");
    assert_eq!(&worker_issues[0][0], "decode");
    let dataset: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("dataset.json"))?)?;
    assert_eq!(dataset["unusable_files"], want.len() + 1, "{dataset}");
    assert_eq!(dataset["unusable_by_kind"]["undecodable"], 1, "{dataset}");
    check_sweep_results(&run_dir, 12, 4)?;
    // Parser warnings: each file's in data_issues.csv, and in the log one line per kind of warning and
    // process (the index, each rank's decode phase), never one per file.
    let warned: Vec<String> = csv_rows(&run_dir.join("data_issues.csv"))?
        .iter()
        .filter(|r| &r[0] == "parser_warning")
        .map(|r| format!("{}: {}", &r[1], &r[2]))
        .collect();
    assert_eq!(warned.len(), 2, "{warned:?}");
    assert!(warned.iter().all(|w| w.contains("charset") && w.contains("ISO_IR 999")), "{warned:?}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("Unsupported character set")).collect();
    assert!(!lines.is_empty() && lines.iter().all(|l| l.contains("DICOM parser:")), "{lines:#?}");
    assert!(lines.len() <= 3 && lines[0].contains("files=2"), "{lines:#?}");

    let run_dir = dir.path().join("fail");
    let config = write_config(dir.path(), "[data]\non_bad_file = \"fail\"\n[pretrain]\nbatch_size = 4\n")?;
    let child = dev_command(&run_dir, &["--workers", "2", "--data", &data_arg, "--config", &config])?.spawn()?;
    let (code, log) = finish(child).await?;
    assert_eq!(code, ExitStatus::DataError.code(), "{log}");
    let first = messy.refused.keys().next().unwrap();
    assert!(log.contains(first.as_str()) && log.contains("on_bad_file"), "{log}");
    assert!(!run_dir.join("cluster.json").exists(), "workers started despite on_bad_file = fail");

    // Only the file no header check can catch: the workers find it, and bad data is a permanent
    // failure: the job stops at once, without a restart.
    for path in messy.refused.keys() {
        std::fs::remove_file(messy.root.join(path))?;
    }
    let run_dir = dir.path().join("fail-on-a-worker");
    let child = dev_command(&run_dir, &["--workers", "2", "--data", &data_arg, "--config", &config])?.spawn()?;
    let (code, log) = finish(child).await?;
    assert_eq!(code, ExitStatus::JobAborted.code(), "{log}");
    assert!(log.contains("jpeg_baseline_no_scan.dcm") && log.contains("a permanent failure: not restarted"), "{log}");
    assert!(!log.contains("restarting the job"), "{log}");
    Ok(())
}

/// A job stopped after a few steps and started again on the same run directory resumes from its last
/// checkpoint and ends with exactly the weights of a run that was never stopped (2 workers, synchronised
/// BatchNorm, augmentation on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pretraining_run_resumed_from_its_checkpoint_ends_with_the_uninterrupted_weights() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let config = write_config(
        dir.path(),
        &format!(
            "{SMALL_DATA}{}",
            TINY_PRETRAIN.replace("batch_size = 6", "batch_size = 4").replace("epochs = 2", "epochs = 3")
        ),
    )?;
    let whole = dir.path().join("whole");
    let (code, log) = finish(dev_command(&whole, &["--workers", "2", "--config", &config])?.spawn()?).await?;
    assert_eq!(code, 0, "{log}");
    let resumed = dir.path().join("resumed");
    let (code, log) =
        finish(dev_command(&resumed, &["--workers", "2", "--config", &config, "--max-steps", "3"])?.spawn()?).await?;
    assert_eq!(code, 0, "{log}");
    let first: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(resumed.join("pretrain.json"))?)?;
    assert_eq!(first["ranks"]["0"]["steps"].as_f64(), Some(3.0), "{first}");
    let (code, log) = finish(dev_command(&resumed, &["--workers", "2", "--config", &config])?.spawn()?).await?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("resuming from the latest checkpoint"), "{log}");
    let whole_stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(whole.join("pretrain.json"))?)?;
    let second: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(resumed.join("pretrain.json"))?)?;
    let total = whole_stats["ranks"]["0"]["steps"].as_f64().unwrap();
    assert!(total > 3.0, "{whole_stats}");
    assert_eq!(second["ranks"]["0"]["steps"].as_f64(), Some(total), "{second}");
    assert_eq!(second["ranks"]["0"]["steps_this_run"].as_f64(), Some(total - 3.0), "{second}");
    let a = std::fs::read(whole.join("encoder.safetensors"))?;
    let b = std::fs::read(resumed.join("encoder.safetensors"))?;
    assert!(a == b, "the resumed run's encoder differs from the uninterrupted run's");
    Ok(())
}

/// Waits until the coordinator's log (stderr) shows `pattern`; returns the lines read so far and the
/// rest of the stream, to be read to its end later.
async fn log_until(
    child: &mut tokio::process::Child,
    pattern: &str,
) -> anyhow::Result<(String, tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStderr>>)> {
    let mut lines = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = String::new();
    let found = tokio::time::timeout(GENEROUS, read_until(&mut lines, &mut log, Some(pattern))).await??;
    anyhow::ensure!(found, "the log never showed '{pattern}':\n{log}");
    Ok((log, lines))
}

/// Starts `dev` on `run_dir` with `args`, SIGKILLs the worker of `rank` once the first checkpoint is
/// written, and waits for the coordinator to exit; its exit code, log, and the first workers' pids.
async fn kill_rank_after_first_checkpoint(
    run_dir: &Path,
    args: &[&str],
    rank: usize,
) -> anyhow::Result<(i32, String, Vec<u32>)> {
    let (code, log, pids, _) = kill_ranks_after_first_checkpoint(run_dir, args, &[rank]).await?;
    Ok((code, log, pids))
}

/// A worker killed (SIGKILL) in the middle of pretraining: the coordinator restarts the whole group
/// from the last checkpoint, and the run ends with exactly the weights of a run never interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_pretraining_is_restarted_and_the_weights_match_an_uninterrupted_run(
) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let body = format!(
        "{SMALL_DATA}[cluster]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1500\n{}",
        TINY_PRETRAIN.replace("batch_size = 6", "batch_size = 4").replace("epochs = 2", "epochs = 10")
    );
    let config = write_config(dir.path(), &body)?;
    let whole = dir.path().join("whole");
    let (code, log) = finish(dev_command(&whole, &["--workers", "2", "--config", &config])?.spawn()?).await?;
    assert_eq!(code, 0, "{log}");

    let killed = dir.path().join("killed");
    let (code, log, pids) =
        kill_rank_after_first_checkpoint(&killed, &["--workers", "2", "--config", &config], 1).await?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("restarting from the last checkpoint (restart 1 of 3)"), "{log}");
    assert!(log.contains("resuming from the latest checkpoint"), "{log}");
    let total = |dir: &Path| -> anyhow::Result<(f64, f64)> {
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("pretrain.json"))?)?;
        let rank0 = &doc["ranks"]["0"];
        Ok((rank0["steps"].as_f64().unwrap_or(-1.0), rank0["steps_this_run"].as_f64().unwrap_or(-1.0)))
    };
    let (whole_steps, _) = total(&whole)?;
    let (steps, this_run) = total(&killed)?;
    assert_eq!(steps, whole_steps);
    assert!(
        this_run > 0.0 && this_run < steps,
        "the kill did not land during pretraining: {this_run} of {steps} steps after the restart"
    );
    let a = std::fs::read(whole.join("encoder.safetensors"))?;
    let b = std::fs::read(killed.join("encoder.safetensors"))?;
    assert!(a == b, "the restarted run's encoder differs from the uninterrupted run's");
    check_sweep_results(&killed, 12, 1)?;
    for pid in pids {
        assert!(eventually(Duration::from_secs(5), || !pid_alive(pid)).await, "worker {pid} left behind");
    }
    Ok(())
}

/// The coordinator killed (SIGKILL) during the probe sweep, then started again on the same run
/// directory: it resumes from the recorded state. Pretraining comes back from its last checkpoint
/// with nothing left to train, the probe results recorded before the kill are kept, and only the
/// remaining tasks run: every task is reported exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_coordinator_started_again_resumes_the_job_from_its_run_directory() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    let body = format!(
        "{SMALL_DATA}{}[probe]\nhidden = [16]\ndropout = [0.0]\nepochs = [300]\nlinear = false\nseeds = 4\nbootstrap = 0\n",
        TINY_PRETRAIN.split("[probe]").next().unwrap().replace("epochs = 2", "epochs = 1")
    );
    let config = write_config(dir.path(), &body)?;
    let mut child = dev_command(&run_dir, &["--workers", "2", "--config", &config])?.spawn()?;
    let pids = worker_pids(&run_dir).await?;
    let (log, _lines) = log_until(&mut child, "probe 2/8").await?;
    child.start_kill()?;
    child.wait().await?;
    for pid in pids {
        assert!(eventually(Duration::from_secs(10), || !pid_alive(pid)).await, "worker {pid} outlived its coordinator");
    }
    let summary = run_dir.join("summary.json");
    assert!(!summary.exists(), "the killed coordinator wrote a summary:\n{log}");

    let (code, log) = finish(dev_command(&run_dir, &["--workers", "2", "--config", &config])?.spawn()?).await?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("resuming from the latest checkpoint"), "{log}");
    let recovered: u32 = log
        .lines()
        .find(|l| l.contains("probe results recovered from the run directory"))
        .and_then(|l| l.split("recovered=").nth(1))
        .and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|r| r.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no recovered probe results in:\n{log}"))?;
    assert!((2..8).contains(&recovered), "recovered {recovered}:\n{log}");
    // Only the tasks without a recorded result ran again.
    let ran = log.lines().filter(|l| l.contains("probe ") && l.contains("/8: ")).count();
    assert_eq!(ran as u32, 8 - recovered, "{log}");
    check_sweep_results(&run_dir, 8, 1)?;
    let pretrain: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("pretrain.json"))?)?;
    assert_eq!(pretrain["ranks"]["0"]["steps_this_run"].as_f64(), Some(0.0), "{pretrain}");
    Ok(())
}

/// `--elastic`: a worker killed during pretraining, and the job goes on with the two that are left
/// (the global batch of 6 divides by 2), resuming from the last checkpoint, each taking its half of
/// the same global batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_elastic_job_goes_on_with_the_workers_that_are_left() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let body = format!(
        "{SMALL_DATA}[cluster]\nheartbeat_interval_ms = 100\nheartbeat_timeout_ms = 1500\n{}",
        TINY_PRETRAIN.replace("epochs = 2", "epochs = 10")
    );
    let config = write_config(dir.path(), &body)?;
    let run_dir = dir.path().join("run");
    let args = ["--workers", "3", "--config", &config, "--elastic"];
    let (code, log, _) = kill_rank_after_first_checkpoint(&run_dir, &args, 2).await?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("continuing with 2 of 3 workers (--elastic)"), "{log}");
    assert!(log.contains("resuming from the latest checkpoint"), "{log}");
    let pretrain: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("pretrain.json"))?)?;
    let ranks: Vec<&String> = pretrain["ranks"].as_object().map(|r| r.keys().collect()).unwrap_or_default();
    assert_eq!(ranks, ["0", "1"], "{pretrain}");
    let cluster: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("cluster.json"))?)?;
    assert_eq!(cluster["world_size"], 2, "{cluster}");
    check_sweep_results(&run_dir, 12, 1)?;
    Ok(())
}

/// Every tensor of a safetensors file (float32, or int64 counters such as BatchNorm's
/// `num_batches_tracked`), by name, as float32 values.
fn read_tensors(path: &Path) -> anyhow::Result<BTreeMap<String, Vec<f32>>> {
    let bytes = std::fs::read(path)?;
    let file = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut out = BTreeMap::new();
    for (name, view) in file.tensors() {
        let values = match view.dtype() {
            safetensors::Dtype::F32 => {
                view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
            }
            safetensors::Dtype::I64 => {
                view.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")) as f32).collect()
            }
            other => anyhow::bail!("{name}: unexpected dtype {other:?}"),
        };
        out.insert(name, values);
    }
    Ok(out)
}

/// The largest difference between two encoders' tensors relative to each tensor's own scale (its
/// largest magnitude), with the tensor's name.
fn largest_relative_difference(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> (f64, String) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "the encoders' tensors differ in names");
    let mut worst = (0.0, String::new());
    for (name, x) in a {
        let y = &b[name];
        let scale = x.iter().chain(y).fold(0f64, |m, v| m.max(f64::from(v.abs()))).max(1e-12);
        let diff = x.iter().zip(y).fold(0f64, |m, (p, q)| m.max(f64::from((p - q).abs())));
        if diff / scale > worst.0 {
            worst = (diff / scale, name.clone());
        }
    }
    worst
}

/// The whole-run invariance job: `studies` synthetic studies, the tiny encoder, 3 epochs of a global
/// batch of `batch`, no checkpoints.
fn invariance_job(studies: usize, batch: usize) -> String {
    format!(
        "{}{}",
        SMALL_DATA.replace("synthetic_studies = 24", &format!("synthetic_studies = {studies}")),
        TINY_PRETRAIN
            .replace("batch_size = 6", &format!("batch_size = {batch}"))
            .replace("epochs = 2\n", "epochs = 3\n")
            .replace("checkpoint_every = 2", "checkpoint_every = 0")
    )
}

/// The probe table of results.md (its rows, without the lines that name the world size's timing).
fn probe_table(run_dir: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(run_dir.join("results.md"))?)
}

/// The whole run does not depend on the number of workers: the same job (a tiny encoder, 3 epochs of
/// a global batch of 8 (at least 12 steps), synchronised BatchNorm, LARS, augmentation on) with 1, 2 and 4 workers ends
/// with the same encoder, up to float summation order, and writes the same probe table. The global
/// batch at step t holds the same images and views for any world size; only the order in which
/// floats are added differs (the all-reduce's ring, BatchNorm's partial sums), which after 12 steps
/// moves a weight by about 1e-5 of its tensor's scale (measured: 1.1e-5 with 2 workers, 5.9e-6 with
/// 4); 1e-4 leaves room without letting a different batch through (each rank's share reordered on its
/// own, as a per-rank shuffle would, moves a BatchNorm bias by 1.45 times its scale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_ends_with_the_same_encoder_and_table_for_1_2_and_4_workers() -> anyhow::Result<()> {
    const TOLERANCE: f64 = 1e-4;
    let dir = tempfile::tempdir()?;
    // The monitor looks after every epoch, and each sample's second view comes from another image of
    // its study where there is one: neither may depend on the world size.
    let job = invariance_job(48, 8).replace("epochs = 3\n", "epochs = 3\npositives = \"same_study\"\n");
    let config = write_config(dir.path(), &format!("{job}[pretrain.monitor]\nevery_epochs = 1\n"))?;
    let mut runs = Vec::new();
    let mut monitors = Vec::new();
    for workers in ["1", "2", "4"] {
        let run_dir = dir.path().join(format!("w{workers}"));
        let (code, log) =
            finish(dev_command(&run_dir, &["--workers", workers, "--seed", "5", "--config", &config])?.spawn()?)
                .await?;
        assert_eq!(code, 0, "{workers} workers: {log}");
        let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("pretrain.json"))?)?;
        let (steps, epochs) = (stats["ranks"]["0"]["steps"].as_f64(), stats["ranks"]["0"]["epochs"].as_f64());
        let dataset: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("dataset.json"))?)?;
        let train = &dataset["split"]["train"];
        assert!(train["images"].as_u64() > train["studies"].as_u64(), "no study with two images to pair: {train}");
        assert!(steps.is_some_and(|s| s >= 12.0) && epochs.is_some_and(|e| e >= 2.0), "{workers} workers: {stats}");
        runs.push((workers, read_tensors(&run_dir.join("encoder.safetensors"))?, probe_table(&run_dir)?));
        monitors.push(csv_rows(&run_dir.join("monitor.csv"))?);
    }
    for (workers, looks) in ["2", "4"].iter().zip(&monitors[1..]) {
        assert_eq!(looks.len(), monitors[0].len(), "{workers} workers: another number of monitor looks");
        assert!(looks.len() >= 3, "a look every epoch");
        for (a, b) in monitors[0].iter().zip(looks) {
            assert_eq!((&a[0], &a[1]), (&b[0], &b[1]), "{workers} workers: looks at other epochs or steps");
            // The kNN's and the online linear classifier's validation AUC.
            for (column, what) in [(2, "kNN"), (4, "online linear")] {
                let auc = |r: &csv::StringRecord| r[column].parse::<f64>().unwrap();
                assert!(
                    (auc(a) - auc(b)).abs() < 1e-3,
                    "{workers} workers: {what} AUC {} vs {} at epoch {}",
                    auc(b),
                    auc(a),
                    &a[0]
                );
            }
        }
    }
    let (_, reference, table) = &runs[0];
    for (workers, encoder, other_table) in &runs[1..] {
        let (difference, name) = largest_relative_difference(reference, encoder);
        eprintln!(
            "{workers} workers: largest difference from 1 worker's encoder {difference:.2e} of its scale ({name})"
        );
        assert!(
            difference <= TOLERANCE,
            "{workers} workers: {name} differs from 1 worker's by {difference:.2e} of its scale"
        );
        assert_eq!(table, other_table, "{workers} workers wrote another probe table than 1 worker");
    }
    // The pairing has an effect: the same run with both views from one image ends elsewhere.
    let views = write_config(dir.path(), &invariance_job(48, 8))?;
    let run_dir = dir.path().join("views");
    let (code, log) =
        finish(dev_command(&run_dir, &["--workers", "1", "--seed", "5", "--config", &views])?.spawn()?).await?;
    assert_eq!(code, 0, "{log}");
    let (difference, _) = largest_relative_difference(reference, &read_tensors(&run_dir.join("encoder.safetensors"))?);
    assert!(difference > 100.0 * TOLERANCE, "same_study ended where views did ({difference:.2e})");
    Ok(())
}

/// Sixteen workers on four simulated hosts (`dev --simulate-hosts 4`: each host's workers listen on
/// and advertise their own loopback address, report their own host name, keep their own decode cache
/// and read the dataset through their own mount) end with the 1-worker run's encoder, up to float
/// summation order (the tolerance of the 1/2/4-worker test), and write the same probe table. Each
/// host's cache holds every image the job reads, decoded once there (the decode phase splits the
/// images among the ranks of each host), and the workers report four host names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_workers_on_four_simulated_hosts_end_with_the_one_worker_encoder_and_table() -> anyhow::Result<()> {
    const TOLERANCE: f64 = 1e-4;
    let dir = tempfile::tempdir()?;
    let config = write_config(dir.path(), &invariance_job(192, 32))?;
    let mut runs = Vec::new();
    for (workers, hosts) in [("1", "1"), ("16", "4")] {
        let run_dir = dir.path().join(format!("w{workers}"));
        let args = ["--workers", workers, "--simulate-hosts", hosts, "--seed", "5", "--config", &config];
        let (code, log) = finish(dev_command(&run_dir, &args)?.spawn()?).await?;
        assert_eq!(code, 0, "{workers} workers on {hosts} hosts: {log}");
        let stats: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("pretrain.json"))?)?;
        let steps = stats["ranks"]["0"]["steps"].as_f64();
        assert!(steps.is_some_and(|s| s >= 12.0), "{workers} workers: {stats}");
        if hosts == "4" {
            for k in 0..4 {
                assert!(log.contains(&format!("host-{k}")), "no worker reported host-{k}");
            }
            let entries: Vec<usize> = (0..4)
                .map(|k| {
                    let cache = run_dir.join(format!("hosts/host-{k}/cache/decoded"));
                    std::fs::read_dir(&cache).map(|d| d.count()).unwrap_or(0)
                })
                .collect();
            assert!(
                entries[0] > 0 && entries.iter().all(|&n| n == entries[0]),
                "decode cache entries per host: {entries:?}"
            );
        }
        runs.push((read_tensors(&run_dir.join("encoder.safetensors"))?, probe_table(&run_dir)?));
    }
    let (difference, name) = largest_relative_difference(&runs[0].0, &runs[1].0);
    eprintln!(
        "16 workers on 4 hosts: largest difference from 1 worker's encoder {difference:.2e} of its scale ({name})"
    );
    assert!(difference <= TOLERANCE, "16 workers: {name} differs from 1 worker's by {difference:.2e} of its scale");
    assert_eq!(runs[0].1, runs[1].1, "16 workers on 4 hosts wrote another probe table than 1 worker");
    Ok(())
}

/// Starts `dev` on `run_dir` with `args`, SIGKILLs the workers of `ranks` once the first checkpoint
/// is written, and waits for the coordinator to exit; its exit code, log, the first workers' pids, and
/// the seconds from the kill until a worker of the new group resumed from the checkpoint.
async fn kill_ranks_after_first_checkpoint(
    run_dir: &Path,
    args: &[&str],
    ranks: &[usize],
) -> anyhow::Result<(i32, String, Vec<u32>, f64)> {
    let mut child = dev_command(run_dir, args)?.spawn()?;
    let pids = worker_pids(run_dir).await?;
    let (mut log, mut lines) = log_until(&mut child, "checkpoint written").await?;
    let killed = std::time::Instant::now();
    for &rank in ranks {
        // SAFETY: plain syscall on a worker the coordinator spawned.
        unsafe { libc::kill(pids[rank] as i32, libc::SIGKILL) };
    }
    let resumed =
        tokio::time::timeout(GENEROUS, read_until(&mut lines, &mut log, Some("resuming from the latest checkpoint")))
            .await??;
    anyhow::ensure!(resumed, "no worker resumed from the checkpoint:\n{log}");
    let to_resume = killed.elapsed().as_secs_f64();
    let mut stdout = child.stdout.take().unwrap();
    let mut out = String::new();
    tokio::time::timeout(GENEROUS, async {
        tokio::try_join!(read_until(&mut lines, &mut log, None), async {
            stdout.read_to_string(&mut out).await.map_err(anyhow::Error::from)
        })
    })
    .await??;
    let status = tokio::time::timeout(GENEROUS, child.wait()).await??;
    Ok((exit_code(status), log + &out, pids, to_resume))
}

/// Faults at size: 16 workers on 4 simulated hosts, with one worker SIGKILLed during pretraining, and
/// in another run a whole host (its 4 workers): the coordinator restarts the group from the last
/// checkpoint, and each run ends with exactly the weights of the run never interrupted. Prints the
/// seconds from the kill until the new group resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_or_a_whole_host_killed_among_sixteen_workers_costs_a_restart_not_the_weights() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let body = format!(
        "{}[cluster]\nheartbeat_interval_ms = 200\nheartbeat_timeout_ms = 5000\n{}",
        SMALL_DATA.replace("synthetic_studies = 24", "synthetic_studies = 192"),
        TINY_PRETRAIN.replace("batch_size = 6", "batch_size = 32").replace("epochs = 2", "epochs = 3")
    );
    let config = write_config(dir.path(), &body)?;
    let args = ["--workers", "16", "--simulate-hosts", "4", "--config", &config];
    let whole = dir.path().join("whole");
    let (code, log) = finish(dev_command(&whole, &args)?.spawn()?).await?;
    assert_eq!(code, 0, "{log}");
    let reference = std::fs::read(whole.join("encoder.safetensors"))?;
    for (what, ranks) in [("worker 5", vec![5]), ("host-2 (ranks 8-11)", vec![8, 9, 10, 11])] {
        let killed = dir.path().join(format!("killed-{}", ranks[0]));
        let (code, log, pids, to_resume) = kill_ranks_after_first_checkpoint(&killed, &args, &ranks).await?;
        eprintln!("{what} killed: the new group resumed from the checkpoint {to_resume:.1} s later");
        assert_eq!(code, 0, "{what}: {log}");
        assert!(log.contains("restarting from the last checkpoint (restart 1 of 3)"), "{what}: {log}");
        let doc: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(killed.join("pretrain.json"))?)?;
        let this_run = doc["ranks"]["0"]["steps_this_run"].as_f64().unwrap_or(-1.0);
        let steps = doc["ranks"]["0"]["steps"].as_f64().unwrap_or(-1.0);
        assert!(this_run > 0.0 && this_run < steps, "{what}: the kill did not land during pretraining ({doc})");
        let encoder = std::fs::read(killed.join("encoder.safetensors"))?;
        assert!(encoder == reference, "{what}: the restarted run's encoder differs from the uninterrupted run's");
        for pid in pids {
            assert!(eventually(Duration::from_secs(5), || !pid_alive(pid)).await, "{what}: worker {pid} left behind");
        }
    }
    Ok(())
}
