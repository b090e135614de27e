//! TensorBoard event files in the run directory (`<run dir>/tensorboard/events.out.tfevents.*`), so
//! that `tensorboard --logdir runs/` shows a job as it runs: every metric rank 0 reports while
//! pretraining (loss, contrastive accuracy, learning rate, images/s, epoch, seconds in collectives so
//! far) under `pretrain/<name>` by step, and every probe task's per-epoch train
//! and test accuracy and loss plus its test AUC under `probe/<encoder>/<configuration>/seed <k>/...`.
//!
//! The file format is TensorBoard's record file: each record is its length (u64, little endian), the
//! masked CRC-32C of those 8 bytes, the serialized `Event` (prost, from `proto/tensorboard/event.proto`)
//! and its masked CRC-32C. The first event carries the file version. Records are flushed as they are
//! written, so a crash loses at most the record being written.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use simclr_common::probe::ProbeOutcome;
use simclr_proto::tensorboard::{event, summary, Event, Summary};
use tokio::sync::broadcast::error::RecvError;

use simclr_common::crc32c::masked_crc32c as masked_crc;

use crate::job::{Job, JobEvent};

fn wall_time() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// One event file, appended to record by record.
pub struct EventWriter {
    file: BufWriter<File>,
    path: PathBuf,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if missing) and writes the file-version record.
    pub fn create(dir: &Path) -> std::io::Result<EventWriter> {
        std::fs::create_dir_all(dir)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", dir.display())))?;
        let host = hostname();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let path = dir.join(format!("events.out.tfevents.{}.{host}.{}.simclr", now.as_secs(), std::process::id()));
        let file = File::create(&path)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot create {}: {e}", path.display())))?;
        let mut writer = EventWriter { file: BufWriter::new(file), path };
        writer.write(&Event {
            wall_time: wall_time(),
            step: 0,
            what: Some(event::What::FileVersion("brain.Event:2".into())),
        })?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn write(&mut self, event: &Event) -> std::io::Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(&data)?;
        self.file.write_all(&masked_crc(&data).to_le_bytes())?;
        self.file.flush()
    }

    /// Scalars of one step, in one event.
    pub fn scalars(&mut self, step: i64, values: &[(String, f32)]) -> std::io::Result<()> {
        let value = values
            .iter()
            .map(|(tag, v)| summary::Value { tag: tag.clone(), value: Some(summary::value::Value::SimpleValue(*v)) })
            .collect();
        self.write(&Event { wall_time: wall_time(), step, what: Some(event::What::Summary(Summary { value })) })
    }

    /// A probe task's curves (one event per epoch) and its test AUC (at its last epoch).
    pub fn probe(&mut self, outcome: &ProbeOutcome) -> std::io::Result<()> {
        let task = &outcome.task;
        let encoder = format!("{:?}", task.encoder).to_lowercase();
        let prefix = format!("probe/{encoder}/{}/seed {}", task.configuration(), task.seed);
        for point in &outcome.curves {
            let values = [
                (format!("{prefix}/train_accuracy"), point.train_accuracy as f32),
                (format!("{prefix}/test_accuracy"), point.test_accuracy as f32),
                (format!("{prefix}/train_loss"), point.train_loss as f32),
                (format!("{prefix}/test_loss"), point.test_loss as f32),
            ];
            self.scalars(point.epoch as i64, &values)?;
        }
        if let Some(auc) = outcome.mean_over_classes(|c| c.auc) {
            let last = outcome.last().map_or(0, |p| p.epoch) as i64;
            self.scalars(last, &[(format!("{prefix}/test_auc"), auc as f32)])?;
        }
        Ok(())
    }
}

/// This host's name where it is safe in a file name, else "host".
fn hostname() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty() && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.'))
        .unwrap_or_else(|| "host".into())
}

/// Writes the job's events into `<run dir>/tensorboard` as they happen, until the job's event stream
/// ends. A file that cannot be written is logged once and the job goes on without it.
pub async fn follow(job: Arc<Job>) {
    let dir = job.run_dir().path().join("tensorboard");
    let mut events = job.subscribe();
    let mut writer = match EventWriter::create(&dir) {
        Ok(writer) => writer,
        Err(e) => {
            tracing::warn!("no TensorBoard events for this job: {e}");
            return;
        }
    };
    tracing::info!(path = %writer.path().display(), "TensorBoard events");
    loop {
        let written = match events.recv().await {
            Ok(JobEvent::Progress { phase, step, metrics, .. }) if phase == "pretrain" => {
                let values: Vec<(String, f32)> = metrics
                    .iter()
                    .filter(|(_, v)| v.is_finite())
                    .map(|(name, v)| (format!("pretrain/{name}"), *v as f32))
                    .collect();
                writer.scalars(step as i64, &values)
            }
            Ok(JobEvent::ProbeResult(outcome)) => writer.probe(&outcome),
            Ok(_) => Ok(()),
            Err(RecvError::Lagged(n)) => {
                tracing::debug!(missed = n, "TensorBoard writer fell behind; some progress points are missing");
                Ok(())
            }
            Err(RecvError::Closed) => break,
        };
        if let Err(e) = written {
            tracing::warn!(path = %writer.path().display(), "cannot write TensorBoard events: {e}; stopping them");
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_framed_with_masked_crcs() {
        let dir = tempfile::tempdir().unwrap();
        let mut writer = EventWriter::create(dir.path()).unwrap();
        writer.scalars(7, &[("pretrain/loss".into(), 1.5)]).unwrap();
        let bytes = std::fs::read(writer.path()).unwrap();
        let mut at = 0;
        let mut events = Vec::new();
        while at < bytes.len() {
            let len_bytes = &bytes[at..at + 8];
            let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
            assert_eq!(u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()), masked_crc(len_bytes));
            let data = &bytes[at + 12..at + 12 + len];
            assert_eq!(u32::from_le_bytes(bytes[at + 12 + len..at + 16 + len].try_into().unwrap()), masked_crc(data));
            events.push(Event::decode(data).unwrap());
            at += 16 + len;
        }
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].what, Some(event::What::FileVersion("brain.Event:2".into())));
        let Some(event::What::Summary(summary)) = &events[1].what else { panic!("{:?}", events[1]) };
        assert_eq!((events[1].step, summary.value[0].tag.as_str()), (7, "pretrain/loss"));
    }
}
