//! Who is in the job and whether they are alive: registration and the rendezvous, heartbeats and
//! their deadlines, lost workers (declared here or reported by a peer), and departures.

use super::*;

impl Job {
    /// Admits a worker and waits for the rendezvous to complete; returns its rank and the peer table.
    /// If the caller goes away first (its call is cancelled), its registration is withdrawn.
    pub async fn register(&self, reg: Registration) -> Result<(u32, PeerTable), Status> {
        let instance_id = reg.worker.instance_id.clone();
        let who = reg.worker.to_string();
        {
            let mut state = self.lock();
            if let Some((notice, _)) = &state.outcome {
                let message = format!("job {} is stopping: {notice}", self.job_id);
                // A worker restarted early, before the coordinator's next attempt: it retries.
                return Err(if self.restart_follows(&state) {
                    Status::unavailable(message)
                } else {
                    Status::failed_precondition(message)
                });
            }
            let completed = state.rendezvous.register(reg).map_err(rendezvous_status)?;
            tracing::info!(worker = %who, arrived = state.rendezvous.pending().len(), world_size = state.rendezvous.world_size(), "worker registered");
            if let Some(table) = completed {
                self.complete_rendezvous(&mut state, &table);
                drop(state);
                self.emit(JobEvent::Registered { worker: who });
                self.emit(JobEvent::RendezvousComplete { table });
            } else {
                drop(state);
                self.emit(JobEvent::Registered { worker: who });
            }
        }
        let mut guard = WithdrawOnDrop { job: self, instance_id: Some(instance_id.clone()) };
        self.wait_for(|s| s.rendezvous.table().is_some() || s.outcome.is_some()).await;
        guard.instance_id = None;
        let state = self.lock();
        if let Some(table) = state.rendezvous.table() {
            let rank = table.workers.iter().position(|w| w.instance_id == instance_id).map(|r| r as u32);
            if let Some(rank) = rank {
                return Ok((rank, table.clone()));
            }
        }
        let why = state.outcome.as_ref().map(|(n, _)| n.to_string()).unwrap_or_default();
        Err(Status::deadline_exceeded(format!("rendezvous of job {} failed: {why}", self.job_id)))
    }

    pub(super) fn complete_rendezvous(&self, state: &mut State, table: &PeerTable) {
        let now = Instant::now();
        state.members = table
            .workers
            .iter()
            .map(|w| Member {
                identity: w.clone(),
                status: MemberStatus::Active,
                last_heartbeat: now,
                phase: "rendezvous".into(),
                step: 0,
                total: 0,
            })
            .collect();
        let timeout = Duration::from_millis(self.config.cluster.peer_timeout_ms);
        let clients = table
            .workers
            .iter()
            .map(|w| lazy_channel(&w.peer_addr, timeout, Some(timeout)).map(|ch| worker_client(ch, self.token.clone())))
            .collect::<Result<Vec<_>, _>>();
        match clients {
            Ok(clients) => {
                let _ = self.worker_clients.set(clients);
            }
            Err(e) => {
                let message = format!("a worker advertised an unusable peer address: {}", e.message());
                self.set_outcome(state, StopReason::Aborted, message, ExitStatus::Rendezvous, false);
            }
        }
        let ranks: Vec<String> = table.workers.iter().enumerate().map(|(r, w)| format!("{r}={w}")).collect();
        tracing::info!(job = %self.job_id, world_size = table.world_size(), ranks = %ranks.join(", "), "rendezvous complete");
    }

    pub(super) fn withdraw(&self, instance_id: &str) {
        if self.lock().rendezvous.withdraw(instance_id) {
            tracing::warn!(
                worker = instance_id,
                "worker went away before the rendezvous completed; registration withdrawn"
            );
            self.changed.send_replace(());
        }
    }

    /// Checks that `instance_id` holds `rank` in this job.
    pub(super) fn member_index(&self, state: &State, rank: u32, instance_id: &str) -> Result<usize, Status> {
        match state.members.get(rank as usize) {
            Some(m) if m.identity.instance_id == instance_id => Ok(rank as usize),
            Some(m) => Err(Status::permission_denied(format!(
                "rank {rank} of job {} belongs to {}, not to {instance_id}",
                self.job_id, m.identity.instance_id
            ))),
            None => Err(Status::not_found(format!("job {} has no rank {rank} (yet)", self.job_id))),
        }
    }

    pub fn heartbeat(&self, rank: u32, instance_id: &str, phase: &str) -> Result<wire::HeartbeatResponse, Status> {
        let mut state = self.lock();
        let i = self.member_index(&state, rank, instance_id)?;
        let member = &mut state.members[i];
        if member.status == MemberStatus::Active {
            member.last_heartbeat = Instant::now();
            if !phase.is_empty() {
                phase.clone_into(&mut member.phase);
            }
        }
        let lost_ranks = state
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| matches!(m.status, MemberStatus::Lost { .. }))
            .map(|(r, _)| r as u32)
            .collect();
        let stop = state.outcome.as_ref().map(|(n, _)| n.clone().into());
        Ok(wire::HeartbeatResponse { stop, lost_ranks })
    }

    /// Declares every active worker whose last heartbeat is older than the timeout lost.
    pub(super) fn check_heartbeats(&self) {
        let timeout = Duration::from_millis(self.config.cluster.heartbeat_timeout_ms);
        let overdue: Vec<(u32, Duration)> = self
            .lock()
            .members
            .iter()
            .enumerate()
            .filter(|(_, m)| m.status == MemberStatus::Active && m.last_heartbeat.elapsed() > timeout)
            .map(|(r, m)| (r as u32, m.last_heartbeat.elapsed()))
            .collect();
        for (rank, silent) in overdue {
            self.declare_lost(
                rank,
                format!(
                    "no heartbeat for {:.1}s (cluster.heartbeat_timeout_ms = {})",
                    silent.as_secs_f64(),
                    timeout.as_millis()
                ),
            );
        }
    }

    /// Marks `rank` lost and aborts the job, once. Returns whether the rank is lost (now or before).
    pub fn declare_lost(&self, rank: u32, reason: String) -> bool {
        let mut state = self.lock();
        let Some(member) = state.members.get_mut(rank as usize) else { return false };
        match &member.status {
            MemberStatus::Lost { .. } => return true,
            MemberStatus::Left { .. } => return false,
            MemberStatus::Active => {}
        }
        member.status = MemberStatus::Lost { reason: reason.clone() };
        let who = member.identity.to_string();
        tracing::error!(job = %self.job_id, rank, worker = %who, %reason, "worker lost");
        let alive = state.members.iter().filter(|m| m.status == MemberStatus::Active).count();
        let sweeping = alive > 0 && state.outcome.is_none();
        let newly_stopping = match state.sweep.as_mut() {
            // The sweep needs no collectives: its tasks go to the ranks still alive.
            Some(sweep) if sweeping => {
                let requeued = sweep.requeue_rank(rank);
                state.excused.insert(rank);
                tracing::warn!(rank, requeued, alive, "the probe sweep goes on without the lost rank");
                self.finish_if_complete(&mut state)
            }
            _ => {
                let message = format!("rank {rank} ({who}) lost: {reason}");
                self.set_outcome(&mut state, StopReason::Aborted, message, ExitStatus::JobAborted, true)
            }
        };
        drop(state);
        self.emit(JobEvent::Lost { rank, reason });
        if let Some(notice) = newly_stopping {
            self.announce_stop(notice);
        }
        true
    }

    /// A worker could not reach `peer_rank`: the coordinator checks the peer itself before deciding,
    /// so one worker's network trouble never evicts a healthy peer.
    pub async fn report_peer_failure(
        &self,
        rank: u32,
        instance_id: &str,
        peer_rank: u32,
        error: &str,
    ) -> Result<bool, Status> {
        let peer_addr = {
            let state = self.lock();
            self.member_index(&state, rank, instance_id)?;
            match state.members.get(peer_rank as usize) {
                Some(m) if matches!(m.status, MemberStatus::Lost { .. }) => return Ok(true),
                Some(m) => m.identity.peer_addr.clone(),
                None => return Err(Status::invalid_argument(format!("job {} has no rank {peer_rank}", self.job_id))),
            }
        };
        tracing::warn!(rank, peer_rank, %error, "peer failure reported; checking the peer");
        match self.ping_worker(peer_rank).await {
            Ok(()) => Ok(false),
            Err(e) => Ok(self.declare_lost(
                peer_rank,
                format!(
                    "peer endpoint {peer_addr} unreachable (reported by rank {rank}: {error}; coordinator's check: {})",
                    e.message()
                ),
            )),
        }
    }

    /// Before a rank's failure is taken as permanent: pings every other active rank and declares the
    /// unreachable ones lost (a retryable outcome), since a dead peer is the likelier cause of the error.
    pub async fn check_peers_of(&self, rank: u32) {
        let others: Vec<u32> = {
            let state = self.lock();
            if state.outcome.is_some() {
                return;
            }
            (0..state.members.len() as u32)
                .filter(|&r| r != rank && state.members[r as usize].status == MemberStatus::Active)
                .collect()
        };
        // One at a time: a dead process refuses at once, and each ping is bounded by peer_timeout_ms.
        for peer in others {
            if let Err(e) = self.ping_worker(peer).await {
                self.declare_lost(
                    peer,
                    format!("its peer endpoint is unreachable ({}) after rank {rank} failed", e.message()),
                );
            }
        }
    }

    pub(super) async fn ping_worker(&self, rank: u32) -> Result<(), Status> {
        let Some(mut client) = self.worker_clients.get().and_then(|c| c.get(rank as usize)).cloned() else {
            return Err(Status::not_found(format!("no client for rank {rank}")));
        };
        let world_size = self.config.cluster.world_size;
        client.ping(wire::PingRequest { from_rank: world_size, sequence: 0, payload: vec![] }).await.map(|_| ())
    }

    pub fn deregister(&self, rank: u32, instance_id: &str, success: bool, reason: &str) -> Result<(), Status> {
        let mut state = self.lock();
        let i = self.member_index(&state, rank, instance_id)?;
        if matches!(state.members[i].status, MemberStatus::Left { .. }) {
            return Ok(());
        }
        state.members[i].status = MemberStatus::Left { success, reason: reason.to_string() };
        tracing::info!(job = %self.job_id, rank, success, %reason, "worker deregistered");
        let message = format!("rank {rank} left before the job finished: {reason}");
        // A worker leaves on SIGTERM: a preemption or an eviction, which its replacement survives.
        let notice = self.set_outcome(&mut state, StopReason::Aborted, message, ExitStatus::JobAborted, !success);
        drop(state);
        self.emit(JobEvent::Left { rank, success, reason: reason.to_string() });
        if let Some(notice) = notice {
            self.announce_stop(notice);
        }
        Ok(())
    }
}

pub(super) struct WithdrawOnDrop<'a> {
    job: &'a Job,
    instance_id: Option<String>,
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        if let Some(id) = self.instance_id.take() {
            self.job.withdraw(&id);
        }
    }
}

pub(super) fn rendezvous_status(e: RendezvousError) -> Status {
    let message = e.to_string();
    match e {
        RendezvousError::DuplicateInstance { .. }
        | RendezvousError::DuplicatePeerAddr { .. }
        | RendezvousError::DuplicateRank { .. } => Status::already_exists(message),
        RendezvousError::RankOutOfRange { .. }
        | RendezvousError::WorldSizeMismatch { .. }
        | RendezvousError::JobMismatch { .. } => Status::invalid_argument(message),
        RendezvousError::VersionMismatch { .. } | RendezvousError::Late { .. } => Status::failed_precondition(message),
    }
}
