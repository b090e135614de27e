//! Progress through the phases: per-rank reports, the metrics and unusable files they carry, and the
//! end of a phase (every active rank done), which completes the job after the last one.

use simclr_data::dataset::epoch_order;

use super::*;
use crate::error::CoordinatorError;

impl Job {
    pub fn report_progress(&self, req: wire::ReportProgressRequest) -> Result<(), Status> {
        let mut state = self.lock();
        let i = self.member_index(&state, req.rank, &req.instance_id)?;
        {
            let m = &mut state.members[i];
            m.phase.clone_from(&req.phase);
            m.step = req.step;
            m.total = req.total;
        }
        for issue in &req.issues {
            // One row per file: a file already listed (by another rank, phase or attempt) stays as it was.
            if state.file_issues.contains_key(&issue.path) {
                continue;
            }
            tracing::warn!(rank = req.rank, phase = %req.phase, path = %issue.path, reason = %issue.reason, "unusable file");
            state.file_issues.insert(issue.path.clone(), (req.phase.clone(), req.rank, issue.reason.clone()));
            if req.phase == PHASE_DECODE {
                if let Some(&i) = self.data.as_ref().and_then(|d| d.image_of_path.get(&issue.path)) {
                    state.undecodable.insert(i, issue.reason.clone());
                }
            }
        }
        if !req.error.is_empty() {
            tracing::error!(rank = req.rank, phase = %req.phase, error = %req.error, "phase failed on a worker");
            let message = format!("rank {} failed in phase {}: {}", req.rank, req.phase, req.error);
            let status = ExitStatus::JobAborted;
            if let Some(notice) = self.set_outcome(&mut state, StopReason::Aborted, message, status, req.retryable) {
                drop(state);
                self.changed.send_replace(());
                self.announce_stop(notice);
            }
            return Ok(());
        }
        if !req.checkpoint.is_empty() {
            tracing::info!(rank = req.rank, phase = %req.phase, step = req.step, path = %req.checkpoint, "checkpoint written");
            if let Err(e) = self.run_dir.write_checkpoint(&req.phase, req.rank, req.step, &req.checkpoint) {
                tracing::warn!(error = %e, "cannot record the checkpoint");
            }
        }
        if !req.phase_done {
            if req.rank == 0 && !req.metrics.is_empty() {
                let mut metrics: Vec<(&String, &f64)> = req.metrics.iter().collect();
                metrics.sort_by(|a, b| a.0.cmp(b.0));
                let text: Vec<String> = metrics.iter().map(|(k, v)| format!("{k}={}", format_metric(**v))).collect();
                tracing::info!(phase = %req.phase, step = req.step, total = req.total, "{}", text.join(" "));
                drop(state);
                self.emit(JobEvent::Progress {
                    phase: req.phase,
                    step: req.step,
                    total: req.total,
                    metrics: req.metrics.into_iter().collect(),
                });
            } else {
                tracing::debug!(rank = req.rank, phase = %req.phase, step = req.step, total = req.total, "progress");
            }
            return Ok(());
        }
        // Ranks move through the phases at their own pace; each reports them in order. A phase is
        // complete once every rank has reported it, the job once every phase is.
        let Some(position) = PHASES.iter().position(|p| *p == req.phase) else {
            return Err(Status::invalid_argument(format!("rank {} reported unknown phase '{}'", req.rank, req.phase)));
        };
        if let Some(missing) =
            PHASES[..position].iter().find(|p| !state.results.get(**p).is_some_and(|r| r.contains_key(&req.rank)))
        {
            return Err(Status::failed_precondition(format!(
                "rank {} finished phase '{}' before phase '{missing}'",
                req.rank, req.phase
            )));
        }
        state.results.entry(req.phase.clone()).or_default().insert(req.rank, req.metrics.into_iter().collect());
        if !self.phase_complete(&state, &req.phase) {
            return Ok(());
        }
        tracing::info!(job = %self.job_id, phase = %req.phase, "phase complete on every rank");
        let mut notice = self.finish_if_complete(&mut state);
        if req.phase == PHASE_DECODE {
            notice = notice.or(self.fix_usable(state));
        } else {
            drop(state);
        }
        self.emit(JobEvent::PhaseComplete { phase: req.phase });
        if let Some(notice) = notice {
            self.announce_stop(notice);
        }
        Ok(())
    }

    /// Once the decode phase is over everywhere: fixes what pretraining and the probes read (every image
    /// but those that failed to decode), checks that the training images still fill a global batch,
    /// and writes the run directory's record of it (`worker_file_issues.csv`, `undecodable.json`, and
    /// `dataset.json` and `split.csv` without the failed files). Takes the lock; returns a stop notice
    /// to announce when too few images are left.
    fn fix_usable(&self, mut state: MutexGuard<'_, State>) -> Option<StopNotice> {
        let data = self.data.as_ref()?;
        let excluded: BTreeSet<usize> = state.undecodable.keys().copied().collect();
        let mut usable = Usable::new(data, &excluded, self.config.pretrain.positives);
        let batch = self.config.pretrain.batch_size;
        let steps = match epoch_order(&usable.training, batch, self.config.job.seed, 0, self.config.data.shard_policy) {
            Ok(order) => Some(order.len() / batch),
            Err(e) if self.config.pretrain.enabled => {
                let message = format!(
                    "after the decode phase: {e} ({} files did not decode; see worker_file_issues.csv)",
                    excluded.len()
                );
                let notice = self.set_outcome(&mut state, StopReason::Aborted, message, ExitStatus::DataError, false);
                drop(state);
                self.changed.send_replace(());
                return notice;
            }
            Err(_) => None,
        };
        // The probes' training labels; a label fraction that leaves them a single class stops the job
        // now, not after pretraining.
        if self.config.probe.enabled && !data.targets.is_empty() {
            let (fraction, seed) = (self.config.probe.label_fraction, self.config.data.split_seed);
            match super::assignments::label_subset(&usable.labelled[0], data, fraction, seed) {
                Ok(subset) => usable.probe_train = subset,
                Err(message) => {
                    let notice =
                        self.set_outcome(&mut state, StopReason::Aborted, message, ExitStatus::DataError, false);
                    drop(state);
                    self.changed.send_replace(());
                    return notice;
                }
            }
        }
        let issues = issue_rows(&state.file_issues);
        let records: Vec<UndecodableFile> = state
            .undecodable
            .iter()
            .map(|(&i, reason)| {
                let img = &data.dataset.index.images[i];
                let path = img.path.display().to_string();
                let rank = state.file_issues.get(&path).map_or(0, |(_, rank, _)| *rank);
                UndecodableFile {
                    path,
                    rank,
                    file_size: img.file_size,
                    modified_ns: u64::try_from(img.modified_ns).unwrap_or(u64::MAX),
                    reason: reason.clone(),
                }
            })
            .collect();
        if !excluded.is_empty() {
            tracing::warn!(
                files = excluded.len(),
                training_images = usable.training.len(),
                "files that did not decode are left out of pretraining and the probes (worker_file_issues.csv)"
            );
        }
        state.usable = Some(Arc::new(usable));
        drop(state);
        self.changed.send_replace(());
        let written = self
            .run_dir
            .write_file_issues("worker_file_issues.csv", &issues)
            .and_then(|()| self.run_dir.write_undecodable(&records))
            .map_err(CoordinatorError::RunDir)
            .and_then(|()| crate::data_plan::write_decoded_reports(data, &excluded, steps, &self.run_dir));
        if let Err(e) = written {
            tracing::warn!(error = %e, "cannot record the decode phase's results in the run directory");
        }
        None
    }

    /// Whether every rank has reported `phase`, a rank lost during the probe sweep excepted.
    pub(super) fn phase_complete(&self, state: &State, phase: &str) -> bool {
        let reported = state.results.get(phase);
        (0..state.members.len() as u32)
            .all(|r| state.excused.contains(&r) || reported.is_some_and(|results| results.contains_key(&r)))
    }

    /// Sets the successful outcome once every phase is complete; returns the notice to announce.
    pub(super) fn finish_if_complete(&self, state: &mut State) -> Option<StopNotice> {
        if !PHASES.iter().all(|p| self.phase_complete(state, p)) {
            return None;
        }
        let world_size = state.members.len();
        let finished = world_size - state.excused.len();
        let mut message = format!("all {finished} ranks finished: {}", PHASES.join(", "));
        if !state.excused.is_empty() {
            let lost: Vec<String> = state.excused.iter().map(u32::to_string).collect();
            message = format!(
                "{finished} of {world_size} ranks finished: {} (rank {} lost during the probe sweep; its tasks were re-run)",
                PHASES.join(", "),
                lost.join(", ")
            );
        }
        self.set_outcome(state, StopReason::Completed, message, ExitStatus::Success, false)
    }
}

/// A metric for a log line: 4 significant digits.
pub(super) fn format_metric(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{}", (v * 1e4).round() / 1e4)
    }
}
