//! The job from start to end: the rendezvous deadline, the heartbeat watchdog, the stop, the drain and
//! the run directory's reports.

use super::*;

impl Job {
    /// Runs the job to its end: waits for the rendezvous (up to its timeout), watches heartbeats until a
    /// stop, gives workers the grace period to deregister, and writes the run directory's reports.
    pub async fn drive(self: Arc<Self>) -> JobOutcome {
        let c = &self.config.cluster;
        let deadline = self.started + Duration::from_millis(c.rendezvous_timeout_ms);
        let rendezvous = self.wait_for(|s| s.rendezvous.table().is_some() || s.outcome.is_some());
        if tokio::time::timeout_at(deadline.into(), rendezvous).await.is_err() {
            let message = {
                let state = self.lock();
                let arrived: Vec<String> = state.rendezvous.pending().iter().map(|r| r.worker.to_string()).collect();
                format!(
                    "rendezvous timed out after {:.0}s (cluster.rendezvous_timeout_ms): {} of {} workers registered [{}]",
                    c.rendezvous_timeout_ms as f64 / 1000.0,
                    arrived.len(),
                    c.world_size,
                    arrived.join("; ")
                )
            };
            self.abort(StopReason::Aborted, message, ExitStatus::Rendezvous);
        }
        if let Some(table) = self.peer_table() {
            if let Err(e) = self.run_dir.write_cluster(&self.job_id, &table) {
                tracing::warn!(error = %e, "cannot write cluster.json");
            }
        }

        let watchdog = {
            let job = Arc::clone(&self);
            let period = Duration::from_millis((c.heartbeat_interval_ms / 2).max(10));
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(period);
                loop {
                    tick.tick().await;
                    job.check_heartbeats();
                }
            })
        };
        self.wait_for(|s| s.outcome.is_some()).await;

        let grace = Duration::from_millis(c.shutdown_grace_ms);
        let drained =
            tokio::time::timeout(grace, self.wait_for(|s| s.members.iter().all(|m| m.status != MemberStatus::Active)))
                .await;
        watchdog.abort();
        if drained.is_err() {
            let mut state = self.lock();
            for (rank, m) in state.members.iter_mut().enumerate() {
                if m.status == MemberStatus::Active {
                    tracing::warn!(rank, worker = %m.identity, "worker did not deregister within cluster.shutdown_grace_ms");
                    m.status = MemberStatus::Lost { reason: "did not deregister after the stop notice".into() };
                }
            }
        }

        let (outcome, members, results, issues) = {
            let state = self.lock();
            let (notice, status) = state.outcome.clone().expect("the job stops only once an outcome is set");
            let retryable = state.retryable;
            let outcome = JobOutcome { status, message: notice.message, results_table: None, retryable };
            (outcome, state.members.clone(), state.results.clone(), issue_rows(&state.file_issues))
        };
        if !issues.is_empty() {
            if let Err(e) = self.run_dir.write_file_issues("worker_file_issues.csv", &issues) {
                tracing::warn!(error = %e, "cannot write worker_file_issues.csv");
            }
        }
        for (phase, per_rank) in &results {
            if let Err(e) = self.run_dir.write_phase_results(phase, per_rank) {
                tracing::warn!(error = %e, phase, "cannot write phase results");
            }
        }
        if let Err(e) = crate::plots::write_monitor_plot(&self.run_dir) {
            tracing::warn!(error = %e, "cannot draw the pretraining monitor's plot");
        }
        let mut outcome = outcome;
        outcome.results_table = self.write_sweep_reports();
        if let Err(e) = self.run_dir.write_summary(&self.job_id, &outcome, &members, self.started.elapsed()) {
            tracing::warn!(error = %e, "cannot write summary.json");
        }
        outcome
    }
}
