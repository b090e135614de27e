//! The probe sweep as the job sees it: tasks handed out from the queue, results recorded once (and
//! journaled, so a restarted coordinator resumes), and the sweep's reports.

use super::*;

/// How long a `NextProbeTask` call waits for a task to come free before answering "wait".
pub(super) const SWEEP_POLL: Duration = Duration::from_secs(10);

impl Job {
    /// The next probe task for `rank`; waits up to `SWEEP_POLL` for one to come free while others run.
    pub async fn next_probe_task(&self, rank: u32, instance_id: &str) -> Result<wire::NextProbeTaskResponse, Status> {
        let deadline = tokio::time::Instant::now() + SWEEP_POLL;
        let mut changed = self.changed.subscribe();
        loop {
            {
                let mut state = self.lock();
                let i = self.member_index(&state, rank, instance_id)?;
                if let MemberStatus::Lost { reason } = &state.members[i].status {
                    return Err(Status::failed_precondition(format!(
                        "rank {rank} was declared lost ({reason}); its probe tasks went to the other ranks"
                    )));
                }
                if let Some((notice, _)) = &state.outcome {
                    return Err(Status::aborted(format!("job {} is stopping: {notice}", self.job_id)));
                }
                if state.sweep.is_none() {
                    let tasks = self.config.probe.expand(self.config.job.seed);
                    let mut sweep = SweepQueue::new(tasks);
                    let recovered = std::mem::take(&mut state.recovered);
                    let mut kept = 0;
                    for outcome in recovered {
                        match sweep.complete(outcome) {
                            Ok(true) => kept += 1,
                            Ok(false) => {}
                            Err(e) => tracing::warn!("a recorded probe result does not fit this sweep: {e}"),
                        }
                    }
                    if kept > 0 {
                        tracing::info!(
                            recovered = kept,
                            tasks = sweep.len(),
                            "probe results recovered from the run directory; the sweep runs the rest"
                        );
                    }
                    tracing::info!(tasks = sweep.len(), "probe sweep started");
                    state.sweep = Some(sweep);
                }
                let Some(sweep) = state.sweep.as_mut() else { unreachable!("the sweep was just created") };
                let (done, total) = (sweep.done() as u32, sweep.len() as u32);
                let answer = |state: wire::SweepState, task_json: String| wire::NextProbeTaskResponse {
                    state: state.into(),
                    task_json,
                    done,
                    total,
                };
                match sweep.next(rank) {
                    Next::Task(task) => {
                        let json = serde_json::to_string(&task).map_err(|e| Status::internal(e.to_string()))?;
                        tracing::debug!(rank, task = task.id, "probe task handed out");
                        return Ok(answer(wire::SweepState::Task, json));
                    }
                    Next::Finished => return Ok(answer(wire::SweepState::Finished, String::new())),
                    Next::Wait if tokio::time::Instant::now() >= deadline => {
                        return Ok(answer(wire::SweepState::Wait, String::new()))
                    }
                    Next::Wait => {}
                }
            }
            if tokio::time::timeout_at(deadline, changed.changed()).await.is_err() {
                continue;
            }
        }
    }

    /// Records a probe task's result (once: a duplicate from a rank presumed lost is ignored and
    /// answered false).
    pub fn report_probe_result(&self, rank: u32, instance_id: &str, outcome_json: &str) -> Result<bool, Status> {
        let outcome: ProbeOutcome = serde_json::from_str(outcome_json)
            .map_err(|e| Status::invalid_argument(format!("rank {rank}'s probe result is not valid: {e}")))?;
        if outcome.rank != rank {
            return Err(Status::invalid_argument(format!("rank {rank} reported a result as rank {}", outcome.rank)));
        }
        let mut state = self.lock();
        self.member_index(&state, rank, instance_id)?;
        let Some(sweep) = state.sweep.as_mut() else {
            return Err(Status::failed_precondition(format!(
                "rank {rank} reported a probe result before the sweep began"
            )));
        };
        let task = outcome.task.clone();
        let auc = outcome.mean_over_classes(|c| c.auc);
        let accuracy = outcome.last().map(|p| p.test_accuracy);
        let event = JobEvent::ProbeResult(Box::new(outcome.clone()));
        let line = serde_json::to_string(&outcome).map_err(|e| Status::internal(e.to_string()))?;
        let accepted = sweep.complete(outcome).map_err(Status::invalid_argument)?;
        let (done, total) = (sweep.done() as u64, sweep.len() as u64);
        drop(state);
        if !accepted {
            tracing::info!(rank, task = task.id, "duplicate probe result ignored (the task already has one)");
            return Ok(false);
        }
        // Synced to the run directory before it is reported, so that a restarted coordinator finds it.
        if let Err(e) = self.run_dir.append_probe_result(&line) {
            tracing::warn!(error = %e, "cannot record the probe result; a restart would run its task again");
        }
        let fmt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.3}"));
        tracing::info!(
            rank,
            "probe {done}/{total}: {:?} encoder, {}, seed {}: test AUC {}, accuracy {}",
            task.encoder,
            task.configuration(),
            task.seed,
            fmt(auc),
            fmt(accuracy)
        );
        let mut metrics = BTreeMap::new();
        if let Some(auc) = auc {
            metrics.insert("auc".to_string(), auc);
        }
        self.emit(event);
        self.emit(JobEvent::Progress { phase: "probe".into(), step: done, total, metrics });
        Ok(true)
    }

    /// The share of the test split's labelled images in the majority class of the first target column.
    pub(super) fn majority_rate(&self) -> Option<f64> {
        let data = self.data.as_ref()?;
        let target = *data.targets.first()?;
        let (mut positives, mut n) = (0usize, 0usize);
        for study in data.split.test.iter().map(|&i| &data.dataset.studies[i]) {
            if let Some(labels) = &study.labels {
                n += study.images.len();
                if labels[target] >= 0.5 {
                    positives += study.images.len();
                }
            }
        }
        (n > 0).then(|| positives.max(n - positives) as f64 / n as f64)
    }

    /// With `probe.label_fraction` below 1: how many training labels the probes learned from.
    fn label_note(&self) -> Option<String> {
        let fraction = self.config.probe.label_fraction;
        if fraction >= 1.0 {
            return None;
        }
        let usable = self.lock().usable.clone()?;
        Some(format!(
            "Probes trained on {} of the training side's {} labelled images (probe.label_fraction = {fraction}: \
             that share of its patients, chosen by data.split_seed); pretraining saw every training image.",
            usable.probe_train.len(),
            usable.labelled[0].len()
        ))
    }

    /// Writes the sweep's reports (also for a sweep cut short: whatever was reported); returns the table.
    pub(super) fn write_sweep_reports(&self) -> Option<String> {
        let (results, total) = {
            let state = self.lock();
            let sweep = state.sweep.as_ref()?;
            (sweep.results(), sweep.len())
        };
        if results.is_empty() {
            return None;
        }
        if results.len() < total {
            tracing::warn!(done = results.len(), total, "the probe sweep did not finish; reporting the tasks that did");
        }
        let label_note = self.label_note();
        let mut table = match crate::reports::write_probe_reports(
            &self.run_dir,
            &results,
            self.majority_rate(),
            label_note.as_deref(),
        ) {
            Ok(table) => table,
            Err(e) => {
                tracing::error!(error = %e, dir = %self.run_dir.path().display(), "cannot write the probe reports");
                return None;
            }
        };
        table.push_str(&format!("\nResults: {}/results.{{md,csv,json}}\n", self.run_dir.path().display()));
        match crate::plots::write_probe_plots(&self.run_dir, &results) {
            Ok(paths) => {
                let pngs: Vec<String> = paths
                    .iter()
                    .filter(|p| p.extension().is_some_and(|e| e == "png"))
                    .map(|p| p.display().to_string())
                    .collect();
                if !pngs.is_empty() {
                    table.push_str(&format!("Plots (PNG, and SVG beside each): {}\n", pngs.join(", ")));
                }
            }
            Err(e) => tracing::error!(error = %e, "cannot draw the probe plots"),
        }
        if let Some(data) = self.data.as_ref() {
            match crate::embeddings::write_embedding_reports(&self.run_dir, data) {
                Ok(paths) if !paths.is_empty() => table.push_str(&format!(
                    "Embeddings: {}/embeddings.{{safetensors,csv}}, plots/embeddings.{{png,svg}}\n",
                    self.run_dir.path().display()
                )),
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot write the embeddings' table and plot"),
            }
        }
        Some(table)
    }
}

/// What the probe journal's results depend on: the whole configuration but the cluster section (a
/// restart may come with other ports or another world size) and the job id (dev mode makes a new one
/// each start; the run directory is what names the job).
pub(super) fn probe_fingerprint(config: &JobConfig) -> String {
    let mut config = config.clone();
    config.cluster = Default::default();
    config.job.id = String::new();
    config.to_toml()
}
