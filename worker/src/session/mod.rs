//! One worker's life in a job: serve the peer endpoint, register (with retry and backoff), heartbeat,
//! run the job's phases, wait for the stop notice, deregister, exit. Every wait also watches for the
//! stop notice, an interrupt signal and the loss of the coordinator, so nothing hangs.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use simclr_common::retry::Backoff;
use simclr_common::{ExitStatus, JobConfig, StopNotice, StopReason, WorkerIdentity, PHASES};
use simclr_proto::client::{coordinator_client, lazy_channel, AttachToken, CoordinatorClient};
use simclr_proto::wire;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::comm::Mailbox;
use crate::phase::{decode, preflight, pretrain, probe, PhaseContext, PhaseError, PhaseOutput};

pub mod device;
pub mod error;
pub mod peer;

use device::Device;
use error::WorkerError;
use peer::Control;

/// Everything the command line (or a launcher's environment) decides.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub coordinator: String,
    pub device: Device,
    pub requested_rank: Option<u32>,
    pub expected_world_size: Option<u32>,
    pub expected_job_id: String,
    pub peer_listen: SocketAddr,
    /// Host name or IP that peers should dial; default: the listen IP, or this host's name when
    /// listening on all interfaces.
    pub advertise_host: Option<String>,
    pub connect_timeout: Duration,
    pub token: Option<String>,
    /// `--data-root`: read images only under this directory.
    pub data_root_limit: Option<std::path::PathBuf>,
    /// `--host-name`: the host this worker reports (default: the machine's host name).
    pub host_name: Option<String>,
    /// `--data-mount FROM=TO`: the dataset is mounted at TO on this host where the coordinator
    /// names FROM.
    pub data_mount: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// An interrupt (SIGINT/SIGTERM) delivered to the worker: the token fires, `signal` says which.
#[derive(Clone, Default)]
pub struct Interrupt {
    pub token: CancellationToken,
    pub signal: Arc<std::sync::atomic::AtomicI32>,
}

impl Interrupt {
    pub fn raise(&self, signal: i32) {
        self.signal.store(signal, std::sync::atomic::Ordering::SeqCst);
        self.token.cancel();
    }

    fn signal(&self) -> i32 {
        self.signal.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// How a wait ended.
enum Interrupted {
    Stop(StopNotice),
    Signal(i32),
    CoordinatorLost(String),
}

pub async fn run(opts: WorkerOptions, interrupt: Interrupt) -> Result<ExitStatus, WorkerError> {
    let device = opts.device.open()?;
    let listener = TcpListener::bind(opts.peer_listen)
        .await
        .map_err(|source| WorkerError::Bind { addr: opts.peer_listen.to_string(), source })?;
    let local =
        listener.local_addr().map_err(|source| WorkerError::Bind { addr: opts.peer_listen.to_string(), source })?;
    let host = opts.host_name.clone().unwrap_or_else(|| {
        hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "localhost".into())
    });
    let advertise = opts.advertise_host.clone().unwrap_or_else(|| {
        if local.ip().is_unspecified() {
            host.clone()
        } else {
            local.ip().to_string()
        }
    });
    let identity = WorkerIdentity {
        instance_id: format!("{host}-{}-{:08x}", std::process::id(), rand::random::<u32>()),
        host,
        peer_addr: format!("{advertise}:{}", local.port()),
        device: opts.device.to_string(),
        pid: std::process::id(),
        version: simclr_common::VERSION.into(),
    };
    let span = tracing::info_span!("worker", rank = tracing::field::Empty, job = tracing::field::Empty);
    let control = Control::new();
    let server_shutdown = CancellationToken::new();
    let mailbox = Arc::new(Mailbox::default());
    let server = tokio::spawn(peer::serve(
        listener,
        Arc::clone(&control),
        Arc::clone(&mailbox),
        opts.token.clone(),
        server_shutdown.clone(),
    ));
    tracing::info!(parent: &span, worker = %identity, ?device, coordinator = %opts.coordinator, "worker starting");
    let result = session(&opts, identity, control, mailbox, device, interrupt).instrument(span).await;
    server_shutdown.cancel();
    let _ = server.await;
    result
}

async fn session(
    opts: &WorkerOptions,
    identity: WorkerIdentity,
    control: Arc<Control>,
    mailbox: Arc<Mailbox>,
    device: tch::Device,
    interrupt: Interrupt,
) -> Result<ExitStatus, WorkerError> {
    let token = AttachToken::new(opts.token.as_deref())
        .map_err(|e| WorkerError::Usage { flag: "SIMCLR_CLUSTER_TOKEN", message: e.message().into() })?;
    let channel = lazy_channel(&opts.coordinator, opts.connect_timeout.min(Duration::from_secs(10)), None)
        .map_err(|e| WorkerError::Usage { flag: "--coordinator", message: e.message().into() })?;
    let coordinator = coordinator_client(channel, token.clone());

    let registered = tokio::select! {
        r = register(opts, &identity, coordinator.clone()) => r?,
        _ = interrupt.token.cancelled() => {
            tracing::warn!(signal = interrupt.signal(), "interrupted before the rendezvous completed");
            return Ok(ExitStatus::Interrupted(interrupt.signal()));
        }
    };
    let rank = registered.rank;
    control.set_rank(rank);
    tracing::Span::current().record("rank", rank).record("job", registered.job_id.as_str());
    let config = JobConfig::from_toml(&registered.config_toml, "sent by the coordinator")
        .map_err(|e| WorkerError::JobConfig(e.to_string()))?;
    let table =
        simclr_proto::peer_table_from_wire(registered.peers).map_err(|e| WorkerError::JobConfig(e.message().into()))?;
    tracing::info!(world_size = registered.world_size, attempt = registered.attempt, "joined the job");
    mailbox.join_attempt(registered.attempt);

    let coordinator_lost = CancellationToken::new();
    let lost_reason = Arc::new(std::sync::Mutex::new(String::new()));
    let heartbeat = tokio::spawn(
        heartbeat_loop(
            coordinator.clone(),
            rank,
            identity.instance_id.clone(),
            Arc::clone(&control),
            config.clone(),
            coordinator_lost.clone(),
            Arc::clone(&lost_reason),
        )
        .in_current_span(),
    );
    // Fires on anything that ends the session, so that computations running off the async runtime
    // (the training loop) stop between steps instead of running on after their phase was abandoned.
    let cancel = CancellationToken::new();
    tokio::spawn({
        let (cancel, control, interrupt, lost) =
            (cancel.clone(), Arc::clone(&control), interrupt.clone(), coordinator_lost.clone());
        async move {
            tokio::select! {
                _ = control.stopped() => {}
                _ = interrupt.token.cancelled() => {}
                _ = lost.cancelled() => {}
            }
            cancel.cancel();
        }
    });
    let ctx = PhaseContext {
        rank,
        instance_id: identity.instance_id.clone(),
        table,
        config,
        token,
        coordinator,
        mailbox,
        device,
        interrupt: cancel.clone(),
        peer_listen: opts.peer_listen.ip(),
        cluster_token: opts.token.clone(),
        data_root_limit: opts.data_root_limit.clone(),
        data_mount: opts.data_mount.clone(),
    };
    let lost_message = || lost_reason.lock().map(|s| s.clone()).unwrap_or_default();

    let mut ended = None;
    for &phase in PHASES {
        let outcome = watch(&control, &interrupt, &coordinator_lost, run_phase(phase, &ctx)).await;
        match outcome {
            Ok(Ok(output)) => {
                // A phase end the coordinator refuses would leave the job waiting for this rank
                // forever: report it as this rank's failure instead.
                if let Err(refused) = report_phase(&ctx, phase, output, None).await {
                    report_phase(&ctx, phase, PhaseOutput::default(), Some(PhaseError::permanent(refused))).await.ok();
                    break;
                }
            }
            Ok(Err(error)) => {
                tracing::error!(phase, %error, retryable = error.is_retryable(), "phase failed");
                report_phase(&ctx, phase, PhaseOutput::default(), Some(error)).await.ok();
                break;
            }
            Err(why) => {
                ended = Some(why);
                break;
            }
        }
    }
    // Every phase is done (or one failed): the coordinator decides what comes next.
    let ended = match ended {
        Some(why) => why,
        None => match watch(&control, &interrupt, &coordinator_lost, std::future::pending::<()>()).await {
            Err(why) => why,
            Ok(()) => unreachable!("a pending future never completes"),
        },
    };
    heartbeat.abort();
    let (status, success, reason) = match ended {
        Interrupted::Stop(notice) => {
            let status = match notice.reason {
                StopReason::Completed => ExitStatus::Success,
                StopReason::Aborted | StopReason::Cancelled => ExitStatus::JobAborted,
            };
            match status {
                ExitStatus::Success => tracing::info!(%notice, "job finished"),
                _ => tracing::error!(%notice, "job stopped"),
            }
            (status, notice.reason == StopReason::Completed, format!("stop notice: {notice}"))
        }
        Interrupted::Signal(signal) => {
            tracing::warn!(signal, "interrupted; leaving the job");
            (ExitStatus::Interrupted(signal), false, format!("interrupted by signal {signal}"))
        }
        Interrupted::CoordinatorLost(message) => {
            let message = if message.is_empty() { lost_message() } else { message };
            return Err(WorkerError::CoordinatorLost { addr: opts.coordinator.clone(), message });
        }
    };
    let request = wire::DeregisterRequest { rank, instance_id: identity.instance_id.clone(), reason, success };
    let mut client = ctx.coordinator.clone();
    let deadline = Duration::from_millis(ctx.config.cluster.peer_timeout_ms);
    match tokio::time::timeout(deadline, client.deregister(request)).await {
        Ok(Ok(_)) => tracing::info!("deregistered"),
        Ok(Err(e)) => tracing::warn!(error = %e.message(), "deregistration failed"),
        Err(_) => tracing::warn!("deregistration timed out"),
    }
    Ok(status)
}

/// Runs `work` until it finishes, or until a stop notice, a signal or the loss of the coordinator.
async fn watch<T>(
    control: &Control,
    interrupt: &Interrupt,
    coordinator_lost: &CancellationToken,
    work: impl Future<Output = T>,
) -> Result<T, Interrupted> {
    tokio::select! {
        biased;
        _ = interrupt.token.cancelled() => Err(Interrupted::Signal(interrupt.signal())),
        notice = control.stopped() => Err(Interrupted::Stop(notice)),
        _ = coordinator_lost.cancelled() => Err(Interrupted::CoordinatorLost(String::new())),
        value = work => Ok(value),
    }
}

async fn run_phase(phase: &str, ctx: &PhaseContext) -> Result<PhaseOutput, PhaseError> {
    match phase {
        // Preflight only talks to the peers: its failures are theirs.
        "preflight" => preflight::run(ctx)
            .await
            .map(|metrics| PhaseOutput { metrics, issues: Vec::new() })
            .map_err(PhaseError::retryable),
        "decode" => decode::run(ctx).await,
        "pretrain" => pretrain::run(ctx).await,
        "probe" => probe::run(ctx).await,
        other => Err(PhaseError::permanent(format!(
            "this worker does not know phase '{other}' (version {})",
            simclr_common::VERSION
        ))),
    }
}

/// Reports the end of a phase (or its failure, when `error` is set); the error says why the coordinator
/// did not take it.
async fn report_phase(
    ctx: &PhaseContext,
    phase: &str,
    output: PhaseOutput,
    error: Option<PhaseError>,
) -> Result<(), String> {
    let (error, retryable) = error.map(|e| (e.to_string(), e.is_retryable())).unwrap_or_default();
    let request = wire::ReportProgressRequest {
        rank: ctx.rank,
        instance_id: ctx.instance_id.clone(),
        phase: phase.into(),
        phase_done: error.is_empty(),
        metrics: output.metrics.into_iter().collect(),
        error,
        retryable,
        issues: output.issues.into_iter().map(|(path, reason)| wire::FileIssue { path, reason }).collect(),
        ..Default::default()
    };
    ctx.coordinator.clone().report_progress(request).await.map(|_| ()).map_err(|e| {
        tracing::error!(phase, error = %e.message(), "the coordinator did not take the end of the phase");
        format!("the coordinator did not take the end of phase '{phase}': {}", e.message())
    })
}

struct Registered {
    rank: u32,
    world_size: u32,
    job_id: String,
    config_toml: String,
    peers: Vec<wire::PeerEntry>,
    attempt: u32,
}

/// Registers, retrying with backoff while the coordinator is unreachable, up to the connect timeout.
async fn register(
    opts: &WorkerOptions,
    identity: &WorkerIdentity,
    mut client: CoordinatorClient,
) -> Result<Registered, WorkerError> {
    let started = Instant::now();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5), opts.connect_timeout);
    loop {
        let request = wire::RegisterWorkerRequest {
            worker: Some(identity.clone().into()),
            requested_rank: opts.requested_rank,
            expected_world_size: opts.expected_world_size,
            expected_job_id: opts.expected_job_id.clone(),
        };
        let error = match client.register_worker(request).await {
            Ok(response) => {
                let r = response.into_inner();
                return Ok(Registered {
                    rank: r.rank,
                    world_size: r.world_size,
                    job_id: r.job_id,
                    config_toml: r.config_toml,
                    peers: r.peers,
                    attempt: r.attempt,
                });
            }
            Err(status) if status.code() == tonic::Code::Unavailable => status,
            Err(status) => {
                let message = match status.code() {
                    // Something answers gRPC there, but not the coordinator service (a health port, a
                    // peer's port, another program).
                    tonic::Code::Unimplemented => {
                        "it does not serve the coordinator service (is that the coordinator's port?)".to_string()
                    }
                    code if status.message().is_empty() => format!("{code:?}"),
                    _ => status.message().to_string(),
                };
                return Err(WorkerError::Rejected { addr: opts.coordinator.clone(), message });
            }
        };
        match backoff.next_delay() {
            Some(delay) => {
                tracing::warn!(coordinator = %opts.coordinator, attempt = backoff.attempts() - 1, error = %error.message(), retry_in_ms = delay.as_millis() as u64, "coordinator unreachable; retrying");
                tokio::time::sleep(delay).await;
            }
            None => {
                return Err(WorkerError::CoordinatorUnreachable {
                    addr: opts.coordinator.clone(),
                    attempts: backoff.attempts(),
                    waited_s: started.elapsed().as_secs_f64(),
                    last_error: error.message().to_string(),
                })
            }
        }
    }
}

/// Sends heartbeats; forwards a stop notice from the answer; fires `lost` once the coordinator has not
/// answered for the heartbeat timeout.
async fn heartbeat_loop(
    mut client: CoordinatorClient,
    rank: u32,
    instance_id: String,
    control: Arc<Control>,
    config: JobConfig,
    lost: CancellationToken,
    lost_reason: Arc<std::sync::Mutex<String>>,
) {
    let interval = Duration::from_millis(config.cluster.heartbeat_interval_ms);
    let timeout = Duration::from_millis(config.cluster.heartbeat_timeout_ms);
    let call_deadline = Duration::from_millis(config.cluster.peer_timeout_ms).min(timeout / 2);
    let mut last_answer = Instant::now();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut request = tonic::Request::new(wire::HeartbeatRequest {
            rank,
            instance_id: instance_id.clone(),
            phase: String::new(),
        });
        request.set_timeout(call_deadline);
        match client.heartbeat(request).await {
            Ok(response) => {
                last_answer = Instant::now();
                let response = response.into_inner();
                if let Some(notice) = response.stop {
                    control.notify_stop(notice.into());
                }
            }
            Err(status) => {
                let silent = last_answer.elapsed();
                tracing::warn!(error = %status.message(), silent_ms = silent.as_millis() as u64, "heartbeat failed");
                if silent >= timeout {
                    if let Ok(mut reason) = lost_reason.lock() {
                        *reason = format!(
                            "no answer to heartbeats for {:.1}s (cluster.heartbeat_timeout_ms); last error: {}",
                            silent.as_secs_f64(),
                            status.message()
                        );
                    }
                    lost.cancel();
                    return;
                }
            }
        }
    }
}
