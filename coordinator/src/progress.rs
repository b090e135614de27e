//! The progress bar of a job on a terminal: rank 0's step of the running phase out of its total, with
//! its loss, contrastive accuracy and throughput, and the time left. Log lines (the coordinator's and
//! the workers' relayed ones) are written above it. Off a terminal (a batch job, a pod, a pipe) nothing
//! is drawn and the periodic progress lines in the log say the same.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::sync::broadcast::error::RecvError;

use crate::job::{Job, JobEvent};

static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

fn current() -> Option<ProgressBar> {
    BAR.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

fn replace(bar: Option<ProgressBar>) {
    let old = std::mem::replace(&mut *BAR.lock().unwrap_or_else(|p| p.into_inner()), bar);
    if let Some(old) = old {
        old.finish_and_clear();
    }
}

/// Takes the bar down (before the final report).
pub fn clear() {
    replace(None);
}

fn suspend(write: &mut dyn FnMut()) {
    match current() {
        Some(bar) => bar.suspend(write),
        None => write(),
    }
}

/// The text after the bar: the metrics a user watches, in a fixed order.
pub fn describe(metrics: &std::collections::BTreeMap<String, f64>) -> String {
    let mut parts = Vec::new();
    if let Some(v) = metrics.get("epoch") {
        parts.push(format!("epoch {}", *v as u64));
    }
    if let Some(v) = metrics.get("loss") {
        parts.push(format!("loss {v:.4}"));
    }
    if let Some(v) = metrics.get("contrastive_accuracy") {
        parts.push(format!("acc {:.1}%", 100.0 * v));
    }
    if let Some(v) = metrics.get("images_per_s") {
        parts.push(format!("{v:.0} img/s"));
    }
    parts.join("  ")
}

/// Draws the job's progress until it stops, when stderr is a terminal and the log is text; returns
/// at once otherwise.
pub async fn show(job: Arc<Job>, text_log: bool) {
    if !text_log || !std::io::stderr().is_terminal() {
        return;
    }
    simclr_common::logging::set_suspend(suspend);
    let style =
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} steps  {msg}  ({elapsed}, {eta} left)")
            .expect("a valid template")
            .progress_chars("=> ");
    let mut events = job.subscribe();
    let mut phase = String::new();
    loop {
        match events.recv().await {
            Ok(JobEvent::Progress { phase: p, step, total, metrics }) if total > 0 => {
                let bar = match current() {
                    Some(bar) if p == phase => bar,
                    _ => {
                        let bar = ProgressBar::new(total).with_style(style.clone()).with_prefix(p.clone());
                        replace(Some(bar.clone()));
                        phase = p;
                        bar
                    }
                };
                bar.set_length(total);
                bar.set_position(step);
                bar.set_message(describe(&metrics));
            }
            Ok(JobEvent::PhaseComplete { phase: p }) if p == phase => replace(None),
            Ok(JobEvent::Stopping { .. }) | Err(RecvError::Closed) => break,
            Ok(_) | Err(RecvError::Lagged(_)) => {}
        }
    }
    replace(None);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_reads_like_a_training_log() {
        let metrics = [("loss", 4.56789), ("contrastive_accuracy", 0.1234), ("images_per_s", 41.6), ("epoch", 3.0)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(describe(&metrics), "epoch 3  loss 4.5679  acc 12.3%  42 img/s");
    }
}
