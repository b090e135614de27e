//! The job's shared state and its state machine: rendezvous -> phases -> stop -> drain. Owns liveness
//! (heartbeat deadlines, lost workers), progress, stop notices and the job outcome. The gRPC handlers in
//! `service` and the dev-mode launcher only call into it; it never touches sockets except to push stop
//! notices to workers and to check a peer that another worker reported.
//!
//! Locking: one std mutex around `State`, never held across an await. Every change bumps a watch
//! channel, and waiters re-check their condition after each bump.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use simclr_common::probe::ProbeOutcome;
use simclr_common::{ExitStatus, JobConfig, PeerTable, StopNotice, StopReason, WorkerIdentity, PHASES};
use simclr_data::dataset::epoch_shards;
use simclr_proto::client::{lazy_channel, worker_client, AttachToken, WorkerClient};
use simclr_proto::wire;
use tokio::sync::{broadcast, watch};
use tonic::Status;

use crate::data_plan::PreparedData;
use crate::rendezvous::{Registration, Rendezvous, RendezvousError};
use crate::run_dir::RunDir;
use crate::sweep::{Next, SweepQueue};

#[derive(Debug, Clone, PartialEq)]
pub enum MemberStatus {
    Active,
    Lost { reason: String },
    Left { success: bool, reason: String },
}

#[derive(Debug, Clone)]
pub struct Member {
    pub identity: WorkerIdentity,
    pub status: MemberStatus,
    pub last_heartbeat: Instant,
    pub phase: String,
    pub step: u64,
    pub total: u64,
}

/// What observers (the dev launcher, tests, logs) can follow as it happens.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Registered {
        worker: String,
    },
    RendezvousComplete {
        table: PeerTable,
    },
    PhaseComplete {
        phase: String,
    },
    Lost {
        rank: u32,
        reason: String,
    },
    Left {
        rank: u32,
        success: bool,
        reason: String,
    },
    Stopping {
        notice: StopNotice,
    },
    /// Rank 0's progress within a phase (the step it has reached, of `total`; 0 when unknown).
    Progress {
        phase: String,
        step: u64,
        total: u64,
        metrics: BTreeMap<String, f64>,
    },
    /// A probe task's result, accepted (the first for its task).
    ProbeResult(Box<ProbeOutcome>),
}

/// How the job ended: the exit status of the coordinator and a one-line reason, and the probe sweep's
/// results table (Markdown) when the sweep reported anything.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub status: ExitStatus,
    pub message: String,
    pub results_table: Option<String>,
    /// Whether a restart from the last checkpoint may cure the failure (a worker lost or killed, a
    /// collective cut off), as opposed to a permanent one (bad configuration, bad data, a cancel).
    pub retryable: bool,
}

/// How long a `NextProbeTask` call waits for a task to come free before answering "wait".
const SWEEP_POLL: Duration = Duration::from_secs(10);

struct State {
    rendezvous: Rendezvous,
    members: Vec<Member>,
    /// phase -> rank -> metric -> value
    results: BTreeMap<String, BTreeMap<u32, BTreeMap<String, f64>>>,
    /// Files the workers could not use: (phase, rank, path, reason).
    file_issues: Vec<(String, u32, String, String)>,
    outcome: Option<(StopNotice, ExitStatus)>,
    /// Whether the recorded outcome is a retryable failure.
    retryable: bool,
    /// Values published by one rank for the others (`share_value`).
    shared: BTreeMap<String, Vec<u8>>,
    /// The probe sweep's queue, from the first rank that asks for a task.
    sweep: Option<SweepQueue>,
    /// Ranks lost during the sweep: their tasks went back to the queue, the job goes on without them.
    excused: BTreeSet<u32>,
    /// Probe results an earlier attempt (or coordinator) recorded for this configuration; the sweep
    /// starts with them done.
    recovered: Vec<ProbeOutcome>,
}

pub struct Job {
    pub job_id: String,
    pub config: JobConfig,
    config_toml: String,
    token: AttachToken,
    run_dir: RunDir,
    started: Instant,
    state: Mutex<State>,
    changed: watch::Sender<()>,
    events: broadcast::Sender<JobEvent>,
    worker_clients: OnceLock<Vec<WorkerClient>>,
    data: Option<Arc<PreparedData>>,
    /// 0 for the first attempt, k for the k-th restart.
    pub attempt: u32,
}

impl Job {
    /// `config` must be validated and carry the final job id. `attempt`: 0, or the restart's number.
    pub fn new(
        config: JobConfig,
        token: Option<&str>,
        run_dir: RunDir,
        data: Option<Arc<PreparedData>>,
        attempt: u32,
    ) -> Result<Arc<Job>, Status> {
        let job_id = config.job.id.clone();
        let world_size = config.cluster.world_size;
        let (changed, _) = watch::channel(());
        let (events, _) = broadcast::channel(1024);
        let recovered = match run_dir.open_probe_journal(&probe_fingerprint(&config)) {
            Ok(recovered) => recovered,
            Err(e) => {
                tracing::warn!(error = %e, "cannot use the probe journal; probe results will not survive a restart");
                Vec::new()
            }
        };
        Ok(Arc::new(Job {
            attempt,
            config_toml: config.to_toml(),
            token: AttachToken::new(token)?,
            run_dir,
            started: Instant::now(),
            state: Mutex::new(State {
                rendezvous: Rendezvous::new(job_id.clone(), world_size, simclr_common::VERSION),
                members: Vec::new(),
                results: BTreeMap::new(),
                file_issues: Vec::new(),
                outcome: None,
                retryable: false,
                shared: BTreeMap::new(),
                sweep: None,
                excused: BTreeSet::new(),
                recovered,
            }),
            changed,
            events,
            worker_clients: OnceLock::new(),
            data,
            job_id,
            config,
        }))
    }

    pub fn subscribe(&self) -> broadcast::Receiver<JobEvent> {
        self.events.subscribe()
    }

    pub fn config_toml(&self) -> &str {
        &self.config_toml
    }

    pub fn run_dir(&self) -> &RunDir {
        &self.run_dir
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock is a bug elsewhere; the state itself stays consistent
        // because every mutation is a single assignment, so keep serving.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn emit(&self, event: JobEvent) {
        let _ = self.events.send(event);
        self.changed.send_replace(());
    }

    /// Waits until `done` holds for the state (checked after every change).
    async fn wait_for(&self, mut done: impl FnMut(&State) -> bool) {
        let mut rx = self.changed.subscribe();
        loop {
            if done(&self.lock()) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub fn peer_table(&self) -> Option<PeerTable> {
        self.lock().rendezvous.table().cloned()
    }

    pub fn members(&self) -> Vec<Member> {
        self.lock().members.clone()
    }

    pub fn stop_notice(&self) -> Option<StopNotice> {
        self.lock().outcome.as_ref().map(|(n, _)| n.clone())
    }

    // ---- rendezvous -------------------------------------------------------------------------------

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

    fn complete_rendezvous(&self, state: &mut State, table: &PeerTable) {
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

    fn withdraw(&self, instance_id: &str) {
        if self.lock().rendezvous.withdraw(instance_id) {
            tracing::warn!(
                worker = instance_id,
                "worker went away before the rendezvous completed; registration withdrawn"
            );
            self.changed.send_replace(());
        }
    }

    // ---- liveness ---------------------------------------------------------------------------------

    /// Checks that `instance_id` holds `rank` in this job.
    fn member_index(&self, state: &State, rank: u32, instance_id: &str) -> Result<usize, Status> {
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
    fn check_heartbeats(&self) {
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

    async fn ping_worker(&self, rank: u32) -> Result<(), Status> {
        let Some(mut client) = self.worker_clients.get().and_then(|c| c.get(rank as usize)).cloned() else {
            return Err(Status::not_found(format!("no client for rank {rank}")));
        };
        let world_size = self.config.cluster.world_size;
        client.ping(wire::PingRequest { from_rank: world_size, sequence: 0, payload: vec![] }).await.map(|_| ())
    }

    // ---- progress and departures ------------------------------------------------------------------

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
            tracing::warn!(rank = req.rank, phase = %req.phase, path = %issue.path, reason = %issue.reason, "unusable file");
            state.file_issues.push((req.phase.clone(), req.rank, issue.path.clone(), issue.reason.clone()));
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
        let notice = self.finish_if_complete(&mut state);
        drop(state);
        self.emit(JobEvent::PhaseComplete { phase: req.phase });
        if let Some(notice) = notice {
            self.announce_stop(notice);
        }
        Ok(())
    }

    /// Whether every rank has reported `phase`, a rank lost during the probe sweep excepted.
    fn phase_complete(&self, state: &State, phase: &str) -> bool {
        let reported = state.results.get(phase);
        (0..state.members.len() as u32)
            .all(|r| state.excused.contains(&r) || reported.is_some_and(|results| results.contains_key(&r)))
    }

    /// Sets the successful outcome once every phase is complete; returns the notice to announce.
    fn finish_if_complete(&self, state: &mut State) -> Option<StopNotice> {
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

    /// Stops the job from outside (a signal, a launcher's error). The first stop wins; it is permanent.
    pub fn abort(&self, reason: StopReason, message: String, status: ExitStatus) {
        let notice = self.set_outcome(&mut self.lock(), reason, message, status, false);
        if let Some(notice) = notice {
            self.changed.send_replace(());
            self.announce_stop(notice);
        }
    }

    /// Records the outcome if none is recorded yet; returns the notice to announce when it was new. A
    /// failure's message says whether the job restarts (`retryable`, with restarts left) or not.
    fn set_outcome(
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
    fn restart_follows(&self, state: &State) -> bool {
        state.retryable && self.attempt < self.config.cluster.max_restarts
    }

    /// Tells every active worker to stop, directly on its control endpoint; the heartbeat answer
    /// carries the same notice for any worker this push misses.
    fn announce_stop(&self, notice: StopNotice) {
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

    // ---- data assignment ----------------------------------------------------------------------------

    /// Publishes `value` under `key` (a publisher) or waits until some rank has (a reader, `value`
    /// None); returns the value. Publishing a different value under a key already taken is an error:
    /// two ranks would otherwise join different NCCL communicators.
    pub async fn share_value(
        &self,
        rank: u32,
        instance_id: &str,
        key: &str,
        value: Option<Vec<u8>>,
    ) -> Result<Vec<u8>, Status> {
        const MAX_VALUE: usize = 64 << 10;
        {
            let mut state = self.lock();
            self.member_index(&state, rank, instance_id)?;
            if let Some(value) = value {
                if value.len() > MAX_VALUE {
                    return Err(Status::invalid_argument(format!(
                        "shared value '{key}' is {} bytes; at most {MAX_VALUE}",
                        value.len()
                    )));
                }
                match state.shared.get(key) {
                    Some(old) if *old != value => {
                        return Err(Status::already_exists(format!(
                            "shared value '{key}' was already published with different contents"
                        )))
                    }
                    Some(_) => {}
                    None => {
                        tracing::debug!(rank, key, bytes = value.len(), "value published");
                        state.shared.insert(key.to_string(), value);
                        drop(state);
                        self.changed.send_replace(());
                    }
                }
            }
        }
        self.wait_for(|s| s.shared.contains_key(key) || s.outcome.is_some()).await;
        let state = self.lock();
        match (state.shared.get(key), &state.outcome) {
            (Some(value), _) => Ok(value.clone()),
            (None, Some((notice, _))) => {
                Err(Status::aborted(format!("job {} stopped before '{key}' was published: {notice}", self.job_id)))
            }
            (None, None) => Err(Status::internal(format!("shared value '{key}' vanished"))),
        }
    }

    /// `rank`'s images for `epoch`: its shard of the training studies (the same shards every process
    /// would compute from the seed and epoch) and every world-size-th test image. With `probe`, every
    /// world-size-th labelled training image instead of the shard (no image left out to even the
    /// shards), and only labelled test images.
    pub fn assignment(
        &self,
        rank: u32,
        instance_id: &str,
        epoch: u64,
        probe: bool,
    ) -> Result<wire::GetAssignmentResponse, Status> {
        let world_size = {
            let state = self.lock();
            self.member_index(&state, rank, instance_id)?;
            state.members.len()
        };
        let Some(data) = &self.data else { return Ok(wire::GetAssignmentResponse::default()) };
        let d = &data.dataset;
        let mut study_of = vec![usize::MAX; d.index.images.len()];
        for (s, study) in d.studies.iter().enumerate() {
            for &i in &study.images {
                study_of[i] = s;
            }
        }
        let image_ref = |i: usize| {
            let img = &d.index.images[i];
            let labels = d
                .studies
                .get(study_of[i])
                .and_then(|s| s.labels.as_ref())
                .map(|values| data.targets.iter().map(|&t| values[t]).collect())
                .unwrap_or_default();
            wire::ImageRef {
                path: img.path.display().to_string(),
                sop_uid: img.sop_uid.clone(),
                file_size: img.file_size,
                modified_ns: u64::try_from(img.modified_ns).unwrap_or(u64::MAX),
                labels,
            }
        };
        let images_of = |studies: &[usize]| {
            let mut images: Vec<usize> = studies
                .iter()
                .map(|&i| &d.studies[i])
                .filter(|s| !probe || s.labels.is_some())
                .flat_map(|s| s.images.iter().copied())
                .collect();
            images.sort_unstable();
            images
        };
        let mine = |images: Vec<usize>| -> Vec<wire::ImageRef> {
            images.into_iter().skip(rank as usize).step_by(world_size).map(image_ref).collect()
        };
        let train = if probe {
            mine(images_of(&data.split.train))
        } else {
            let train_studies: Vec<_> = data.split.train.iter().map(|&i| &d.studies[i]).collect();
            let shards =
                epoch_shards(&train_studies, world_size, self.config.job.seed, epoch, self.config.data.shard_policy)
                    .map_err(|e| Status::failed_precondition(e.to_string()))?;
            shards[rank as usize].iter().map(|&i| image_ref(i)).collect()
        };
        Ok(wire::GetAssignmentResponse {
            data_root: data.root.display().to_string(),
            image_size: self.config.data.image_size,
            train,
            test: mine(images_of(&data.split.test)),
            label_columns: data.targets.iter().map(|&t| d.label_columns[t].clone()).collect(),
        })
    }

    // ---- the probe sweep ----------------------------------------------------------------------------

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
    fn majority_rate(&self) -> Option<f64> {
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

    /// Writes the sweep's reports (also for a sweep cut short: whatever was reported); returns the table.
    fn write_sweep_reports(&self) -> Option<String> {
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
        let mut table = match crate::reports::write_probe_reports(&self.run_dir, &results, self.majority_rate()) {
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
        Some(table)
    }

    // ---- the driver -------------------------------------------------------------------------------

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
            (outcome, state.members.clone(), state.results.clone(), state.file_issues.clone())
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
        let mut outcome = outcome;
        outcome.results_table = self.write_sweep_reports();
        if let Err(e) = self.run_dir.write_summary(&self.job_id, &outcome, &members, self.started.elapsed()) {
            tracing::warn!(error = %e, "cannot write summary.json");
        }
        outcome
    }
}

/// What the probe journal's results depend on: the whole configuration but the cluster section (a
/// restart may come with other ports or another world size) and the job id (dev mode makes a new one
/// each start; the run directory is what names the job).
fn probe_fingerprint(config: &JobConfig) -> String {
    let mut config = config.clone();
    config.cluster = Default::default();
    config.job.id = String::new();
    config.to_toml()
}

/// A metric for a log line: 4 significant digits.
fn format_metric(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e5 || v.abs() < 1e-3) {
        format!("{v:.3e}")
    } else {
        format!("{}", (v * 1e4).round() / 1e4)
    }
}

struct WithdrawOnDrop<'a> {
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

fn rendezvous_status(e: RendezvousError) -> Status {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn worker(n: u32) -> Registration {
        Registration {
            worker: WorkerIdentity {
                instance_id: format!("w{n}"),
                host: "localhost".into(),
                peer_addr: format!("127.0.0.1:{}", 40000 + n),
                device: "cpu".into(),
                pid: n,
                version: simclr_common::VERSION.into(),
            },
            requested_rank: Some(n),
            expected_world_size: None,
            expected_job_id: String::new(),
        }
    }

    async fn two_member_job(dir: &Path) -> Arc<Job> {
        let mut config = JobConfig::default();
        config.job.id = "share-test".into();
        config.cluster.world_size = 2;
        let job = Job::new(config, None, RunDir::create(dir).unwrap(), None, 0).unwrap();
        let (a, b) = tokio::join!(job.register(worker(0)), job.register(worker(1)));
        assert_eq!((a.unwrap().0, b.unwrap().0), (0, 1));
        job
    }

    /// A lost worker is a retryable failure: with restarts left, the notice says so and a worker that
    /// registers before the next attempt is told UNAVAILABLE (it retries); without, it says none are
    /// left and such a worker is refused for good. A worker's failure it marks permanent says so.
    #[tokio::test]
    async fn a_lost_worker_is_retryable_and_a_permanent_failure_is_not() {
        for (max_restarts, restarts_left) in [(2, true), (0, false)] {
            let dir = tempfile::tempdir().unwrap();
            let mut config = JobConfig::default();
            config.job.id = "restart-test".into();
            config.cluster.world_size = 2;
            config.cluster.max_restarts = max_restarts;
            let job = Job::new(config, None, RunDir::create(dir.path()).unwrap(), None, 0).unwrap();
            let (a, b) = tokio::join!(job.register(worker(0)), job.register(worker(1)));
            assert!(a.is_ok() && b.is_ok());
            assert!(job.declare_lost(1, "killed".into()));
            let notice = job.stop_notice().unwrap();
            assert_eq!(notice.message.contains("restarting from the last checkpoint (restart 1 of 2)"), restarts_left);
            assert_eq!(notice.message.contains("no restarts left"), !restarts_left, "{notice}");
            let e = job.register(worker(2)).await.unwrap_err();
            let expected = if restarts_left { tonic::Code::Unavailable } else { tonic::Code::FailedPrecondition };
            assert_eq!(e.code(), expected, "{e:?}");
        }
        let dir = tempfile::tempdir().unwrap();
        let job = two_member_job(dir.path()).await;
        let request = wire::ReportProgressRequest {
            rank: 0,
            instance_id: "w0".into(),
            phase: "decode".into(),
            error: "train/broken.dcm: not a DICOM file".into(),
            retryable: false,
            ..Default::default()
        };
        job.report_progress(request).unwrap();
        let notice = job.stop_notice().unwrap();
        assert!(notice.message.ends_with("a permanent failure: not restarted"), "{notice}");
    }

    /// Every assigned image carries its study's target label, and the columns are named.
    #[tokio::test]
    async fn assignments_carry_the_target_labels() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = dir.path().join("data");
        let opts = simclr_data::synth::SynthOptions { studies: 16, seed: 3, image_size: 32 };
        simclr_data::synth::write_dataset(&data_dir, &opts).unwrap();
        let mut config = JobConfig::default();
        config.job.id = "labels-test".into();
        config.cluster.world_size = 2;
        config.data.path = Some(data_dir.clone());
        let prepared = crate::data_plan::prepare(&config.data, 0, 2).unwrap();
        let mut truth: BTreeMap<String, f32> = BTreeMap::new();
        for study in &prepared.dataset.studies {
            let value = study.labels.as_ref().unwrap()[prepared.targets[0]];
            for &i in &study.images {
                truth.insert(prepared.dataset.index.images[i].sop_uid.clone(), value);
            }
        }
        let run_dir = RunDir::create(&dir.path().join("run")).unwrap();
        let job = Job::new(config, None, run_dir, Some(Arc::new(prepared)), 0).unwrap();
        let (a, b) = tokio::join!(job.register(worker(0)), job.register(worker(1)));
        assert!(a.is_ok() && b.is_ok());
        let mut seen = 0;
        for rank in 0..2 {
            let response = job.assignment(rank, &format!("w{rank}"), 0, false).unwrap();
            assert_eq!(response.label_columns, vec!["Typical Appearance".to_string()]);
            for image in response.train.iter().chain(&response.test) {
                assert_eq!(image.labels, vec![truth[&image.sop_uid]], "{}", image.path);
                seen += 1;
            }
        }
        assert!(seen > 0);
        assert!(truth.values().any(|&v| v == 1.0) && truth.values().any(|&v| v == 0.0));
    }

    /// The NCCL unique id's path: readers wait for the publisher, members only, one value per key,
    /// and a job that stops releases the readers with an error instead of leaving them waiting.
    #[tokio::test]
    async fn a_shared_value_reaches_readers_that_asked_before_it_was_published() {
        let dir = tempfile::tempdir().unwrap();
        let job = two_member_job(dir.path()).await;
        let reader = {
            let job = Arc::clone(&job);
            tokio::spawn(async move { job.share_value(1, "w1", "nccl-unique-id/pretrain", None).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "the reader did not wait for the value");
        let id = vec![7u8; 128];
        assert_eq!(job.share_value(0, "w0", "nccl-unique-id/pretrain", Some(id.clone())).await.unwrap(), id);
        assert_eq!(reader.await.unwrap().unwrap(), id);
        // Publishing the same value again is harmless; a different one is refused.
        assert!(job.share_value(0, "w0", "nccl-unique-id/pretrain", Some(id.clone())).await.is_ok());
        let e = job.share_value(0, "w0", "nccl-unique-id/pretrain", Some(vec![1; 128])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::AlreadyExists, "{e:?}");
        let e = job.share_value(1, "intruder", "nccl-unique-id/pretrain", None).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let e = job.share_value(0, "w0", "big", Some(vec![0; 65 << 10])).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");

        let waiting = {
            let job = Arc::clone(&job);
            tokio::spawn(async move { job.share_value(1, "w1", "never", None).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        job.abort(StopReason::Aborted, "rank 0 failed".into(), ExitStatus::JobAborted);
        let e = tokio::time::timeout(Duration::from_secs(5), waiting).await.unwrap().unwrap().unwrap_err();
        assert_eq!(e.code(), tonic::Code::Aborted, "{e:?}");
        assert!(e.message().contains("rank 0 failed"), "{e:?}");
    }
}
