//! The run directory: everything a job leaves for the user (effective config, cluster table, phase
//! results, summary). Every file is written atomically (a temporary file renamed into place), so a
//! crash never leaves a half-written report.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use simclr_common::probe::ProbeOutcome;
use simclr_common::PeerTable;

use crate::events::{JobOutcome, Member, MemberStatus};

/// The probe results recorded so far, for a restarted job (`RunDir::open_probe_journal`).
const PROBE_JOURNAL: &str = "probe_journal.jsonl";

#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    pub fn create(path: &Path) -> std::io::Result<RunDir> {
        std::fs::create_dir_all(path).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot create run directory {}: {e}", path.display()))
        })?;
        Ok(RunDir { path: path.to_path_buf() })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` inside the run directory atomically (`simclr_common::atomic_file`).
    pub fn write_atomic(&self, name: &str, contents: &[u8]) -> std::io::Result<()> {
        simclr_common::atomic_file::write_bytes_atomic(&self.path.join(name), contents)
    }

    pub fn write_config(&self, toml: &str) -> std::io::Result<()> {
        self.write_atomic("config.toml", toml.as_bytes())
    }

    pub fn write_cluster(&self, job_id: &str, table: &PeerTable) -> std::io::Result<()> {
        let ranks: Vec<_> = table
            .workers
            .iter()
            .enumerate()
            .map(|(rank, w)| {
                json!({"rank": rank, "instance_id": w.instance_id, "host": w.host, "peer_addr": w.peer_addr,
                       "device": w.device, "pid": w.pid, "version": w.version})
            })
            .collect();
        let doc = json!({"job_id": job_id, "world_size": table.world_size(), "ranks": ranks});
        self.write_json("cluster.json", &doc)
    }

    pub fn write_phase_results(
        &self,
        phase: &str,
        per_rank: &BTreeMap<u32, BTreeMap<String, f64>>,
    ) -> std::io::Result<()> {
        let doc = json!({"phase": phase, "ranks": per_rank, "cluster": cluster_summary(per_rank)});
        self.write_json(&format!("{phase}.json"), &doc)
    }

    pub fn write_summary(
        &self,
        job_id: &str,
        outcome: &JobOutcome,
        members: &[Member],
        elapsed: Duration,
    ) -> std::io::Result<()> {
        let ranks: Vec<_> = members
            .iter()
            .enumerate()
            .map(|(rank, m)| {
                let (status, success, reason) = match &m.status {
                    MemberStatus::Active => ("active", false, String::new()),
                    MemberStatus::Lost { reason } => ("lost", false, reason.clone()),
                    MemberStatus::Left { success, reason } => ("left", *success, reason.clone()),
                };
                json!({"rank": rank, "worker": m.identity.instance_id, "status": status, "success": success,
                       "reason": reason, "last_phase": m.phase})
            })
            .collect();
        let doc = json!({
            "job_id": job_id,
            "success": outcome.status == simclr_common::ExitStatus::Success,
            "exit_code": outcome.status.code(),
            "message": outcome.message,
            "elapsed_s": elapsed.as_secs_f64(),
            "ranks": ranks,
        });
        self.write_json("summary.json", &doc)
    }

    /// `(phase, rank, path, reason)` rows as CSV.
    pub fn write_file_issues(&self, name: &str, issues: &[(String, u32, String, String)]) -> std::io::Result<()> {
        let rows = issues
            .iter()
            .map(|(phase, rank, path, reason)| [phase.clone(), rank.to_string(), path.clone(), reason.clone()]);
        self.write_atomic(name, csv_text(&["phase", "rank", "path", "reason"], rows).as_bytes())
    }

    /// Records the files the decode phase could not decode (`undecodable.json`), each with what identifies
    /// its content, so that a restarted job (or a new coordinator on this run directory) hands none of
    /// them to a worker again, while a file that has since been replaced is tried afresh.
    pub fn write_undecodable(&self, files: &[UndecodableFile]) -> std::io::Result<()> {
        self.write_json(UNDECODABLE, &serde_json::json!({ "undecodable": files }))
    }

    /// The files an earlier attempt recorded with [`RunDir::write_undecodable`] (none when there is no
    /// record or it cannot be read: the decode phase then finds them again).
    pub fn read_undecodable(&self) -> Vec<UndecodableFile> {
        #[derive(serde::Deserialize)]
        struct Record {
            undecodable: Vec<UndecodableFile>,
        }
        std::fs::read(self.path.join(UNDECODABLE))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Record>(&bytes).ok())
            .map(|r| r.undecodable)
            .unwrap_or_default()
    }

    /// Records the newest checkpoint of the job (`checkpoint.json`): where it is, its step, who wrote it.
    pub fn write_checkpoint(&self, phase: &str, rank: u32, step: u64, path: &str) -> std::io::Result<()> {
        self.write_json(
            "checkpoint.json",
            &serde_json::json!({ "phase": phase, "step": step, "rank": rank, "path": path }),
        )
    }

    /// The probe results recorded for a configuration whose fingerprint is `fingerprint`
    /// (`probe_journal.jsonl`: a header line, then one result per line, each synced before it counts).
    /// A journal of another configuration is replaced by an empty one; a torn last line (a crash while
    /// appending) is dropped.
    pub fn open_probe_journal(&self, fingerprint: &str) -> std::io::Result<Vec<ProbeOutcome>> {
        let path = self.path.join(PROBE_JOURNAL);
        let header = serde_json::to_string(&json!({ "probe_journal": 1, "configuration": fingerprint }))?;
        let mut recovered = Vec::new();
        let mut valid = 0usize;
        if let Ok(text) = std::fs::read_to_string(&path) {
            let mut lines = text.split_inclusive('\n');
            if lines.next().map(str::trim_end) == Some(header.as_str()) {
                valid = header.len() + 1;
                for line in lines {
                    match serde_json::from_str::<ProbeOutcome>(line.trim_end()) {
                        Ok(outcome) if line.ends_with('\n') => {
                            recovered.push(outcome);
                            valid += line.len();
                        }
                        _ => {
                            tracing::warn!(path = %path.display(), "dropping a torn line at the end of the probe journal");
                            break;
                        }
                    }
                }
            } else if !text.is_empty() {
                tracing::info!(path = %path.display(), "the probe journal belongs to another configuration; starting a new one");
            }
        }
        if valid == 0 {
            self.write_atomic(PROBE_JOURNAL, format!("{header}\n").as_bytes())?;
        } else {
            let file = std::fs::OpenOptions::new().write(true).open(&path)?;
            file.set_len(valid as u64)?;
            file.sync_all()?;
        }
        Ok(recovered)
    }

    /// Appends one probe result (a JSON line) to the journal and syncs it.
    pub fn append_probe_result(&self, line: &str) -> std::io::Result<()> {
        let path = self.path.join(PROBE_JOURNAL);
        let mut file = std::fs::OpenOptions::new().append(true).open(&path)?;
        file.write_all(format!("{line}\n").as_bytes())?;
        file.sync_data()
    }

    /// `coordinator.json`: the coordinator process's own CPU time and peak resident memory over the
    /// job (workers excluded: dev mode's are its children, which this does not count), and its wall
    /// time, to see what the coordinator costs as workers and images are added.
    pub fn write_coordinator_usage(&self, wall_seconds: f64) -> std::io::Result<()> {
        // SAFETY: getrusage writes one struct.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 * 1e-6;
        let (user, system) = (seconds(usage.ru_utime), seconds(usage.ru_stime));
        let doc = json!({
            "cpu_seconds": user + system,
            "user_seconds": user,
            "system_seconds": system,
            // Linux reports kilobytes.
            "max_rss_bytes": usage.ru_maxrss as u64 * 1024,
            "wall_seconds": wall_seconds,
        });
        self.write_json("coordinator.json", &doc)
    }

    fn write_json(&self, name: &str, doc: &serde_json::Value) -> std::io::Result<()> {
        let mut text = serde_json::to_string_pretty(doc).map_err(std::io::Error::other)?;
        text.push('\n');
        self.write_atomic(name, text.as_bytes())
    }
}

/// `header` and `rows` as CSV text, quoted by the `csv` crate (a field with a comma, a quote or a line
/// break is quoted).
const UNDECODABLE: &str = "undecodable.json";

/// A file that failed in the decode phase, and its identity when it did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UndecodableFile {
    pub path: String,
    /// The rank that reported it.
    pub rank: u32,
    pub file_size: u64,
    pub modified_ns: u64,
    pub reason: String,
}

pub fn csv_text<Row, Field>(header: &[&str], rows: impl IntoIterator<Item = Row>) -> String
where
    Row: IntoIterator<Item = Field>,
    Field: AsRef<[u8]>,
{
    let mut w = csv::Writer::from_writer(Vec::new());
    // Writing into memory cannot fail.
    let _ = w.write_record(header);
    for row in rows {
        let _ = w.write_record(row);
    }
    String::from_utf8(w.into_inner().unwrap_or_default()).unwrap_or_default()
}

/// The cluster's view of a phase's per-rank metrics: throughputs (`*_per_s` measured per rank) add up,
/// durations (`*seconds`) are the slowest rank's, everything else is the mean over ranks (the ranks of
/// a synchronous phase report the same loss and step counts).
fn cluster_summary(per_rank: &BTreeMap<u32, BTreeMap<String, f64>>) -> BTreeMap<String, f64> {
    let mut keys: Vec<&String> = per_rank.values().flat_map(|m| m.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = BTreeMap::new();
    for key in keys {
        let values: Vec<f64> = per_rank.values().filter_map(|m| m.get(key).copied()).collect();
        let value = if key.ends_with("_per_s") && !key.starts_with("cluster_") {
            values.iter().sum()
        } else if key.ends_with("seconds") {
            values.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        };
        out.insert(key.clone(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded results come back for the same configuration only; a line torn by a crash is dropped
    /// (and cut off, so that the next append starts a clean line).
    #[test]
    fn the_probe_journal_survives_a_torn_line_and_forgets_another_configuration() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(dir.path()).unwrap();
        assert!(run.open_probe_journal("config A").unwrap().is_empty());
        let tasks = simclr_common::probe::ProbeSection::default().expand(0);
        let outcome = |i: usize| ProbeOutcome {
            task: tasks[i].clone(),
            rank: 1,
            seconds: 0.5,
            curves: vec![],
            classes: vec![],
            validation: vec![],
            error: None,
        };
        for i in [3, 5] {
            run.append_probe_result(&serde_json::to_string(&outcome(i)).unwrap()).unwrap();
        }
        let path = dir.path().join(PROBE_JOURNAL);
        let whole = std::fs::read(&path).unwrap();
        let torn = serde_json::to_string(&outcome(7)).unwrap();
        std::fs::write(&path, [whole.as_slice(), &torn.as_bytes()[..torn.len() / 2]].concat()).unwrap();
        let recovered = run.open_probe_journal("config A").unwrap();
        assert_eq!(recovered.iter().map(|o| o.task.id).collect::<Vec<_>>(), vec![3, 5]);
        assert_eq!(std::fs::read(&path).unwrap(), whole, "the torn line was not cut off");
        run.append_probe_result(&serde_json::to_string(&outcome(7)).unwrap()).unwrap();
        assert_eq!(run.open_probe_journal("config A").unwrap().len(), 3);
        assert!(run.open_probe_journal("config B").unwrap().is_empty());
        assert!(run.open_probe_journal("config A").unwrap().is_empty(), "B's journal replaced A's");
    }

    #[test]
    fn the_cluster_summary_adds_throughputs_and_keeps_the_slowest_time() {
        let rank = |ips: f64, secs: f64, loss: f64| -> BTreeMap<String, f64> {
            [("images_per_s", ips), ("cluster_images_per_s", 2.0 * ips), ("seconds", secs), ("final_loss", loss)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect()
        };
        let per_rank = BTreeMap::from([(0, rank(10.0, 5.0, 4.0)), (1, rank(12.0, 6.0, 4.0))]);
        let c = cluster_summary(&per_rank);
        assert_eq!(c["images_per_s"], 22.0);
        assert_eq!(c["cluster_images_per_s"], 22.0);
        assert_eq!(c["seconds"], 6.0);
        assert_eq!(c["final_loss"], 4.0);
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let run = RunDir::create(&dir.path().join("a/b")).unwrap();
        run.write_atomic("x.txt", b"one").unwrap();
        run.write_atomic("x.txt", b"two").unwrap();
        assert_eq!(std::fs::read_to_string(run.path().join("x.txt")).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(run.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.txt")]);
    }
}
