//! How the job stops: the first outcome wins (completed, failed, aborted), whether a restart may cure
//! it, and the stop notice pushed to every worker.

use super::*;

impl Job {
    pub fn abort(&self, reason: StopReason, message: String, status: ExitStatus) {
        let notice = self.set_outcome(&mut self.lock(), reason, message, status, false);
        if let Some(notice) = notice {
            self.changed.send_replace(());
            self.announce_stop(notice);
        }
    }

    /// Records the outcome if none is recorded yet; returns the notice to announce when it was new. A
    /// failure's message says whether the job restarts (`retryable`, with restarts left) or not.
    pub(super) fn set_outcome(
        &self,
        state: &mut State,
        reason: StopReason,
        mut message: String,
        status: ExitStatus,
        retryable: bool,
    ) -> Option<StopNotice> {
        if state.outcome.is_some() {
            return None;
        }
        let max = self.config.cluster.max_restarts;
        if reason == StopReason::Aborted {
            if !retryable {
                message.push_str("; a permanent failure: not restarted");
            } else if self.attempt < max {
                message.push_str(&format!(
                    "; restarting from the last checkpoint (restart {} of {max})",
                    self.attempt + 1
                ));
            } else {
                message.push_str(&format!("; no restarts left (cluster.max_restarts = {max})"));
            }
        }
        let notice = StopNotice { reason, message };
        state.outcome = Some((notice.clone(), status));
        state.retryable = retryable && reason == StopReason::Aborted;
        Some(notice)
    }

    /// Whether the recorded outcome will be followed by another attempt.
    pub(super) fn restart_follows(&self, state: &State) -> bool {
        state.retryable && self.attempt < self.config.cluster.max_restarts
    }

    /// Tells every active worker to stop, directly on its control endpoint; the heartbeat answer
    /// carries the same notice for any worker this push misses.
    pub(super) fn announce_stop(&self, notice: StopNotice) {
        match notice.reason {
            StopReason::Completed => tracing::info!(job = %self.job_id, %notice, "stopping"),
            _ => tracing::error!(job = %self.job_id, %notice, "stopping"),
        }
        let _ = self.events.send(JobEvent::Stopping { notice: notice.clone() });
        let active: Vec<u32> = self
            .lock()
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.status == MemberStatus::Active)
            .map(|(r, _)| r as u32)
            .collect();
        let Some(clients) = self.worker_clients.get() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        for rank in active {
            let mut client = clients[rank as usize].clone();
            let request = wire::StopRequest { notice: Some(notice.clone().into()) };
            runtime.spawn(async move {
                if let Err(e) = client.stop(request).await {
                    tracing::debug!(rank, error = %e.message(), "stop push failed; the heartbeat answer carries it");
                }
            });
        }
    }
}
