//! The coordinator of a simclr-cluster job: rendezvous, liveness, the job's phases, the run directory,
//! and the dev-mode launcher that spawns workers on one machine. Never links libtorch (ARCHITECTURE.md,
//! invariant 6); everything that touches tensors lives in the worker.

pub mod data_plan;
pub mod embeddings;
pub mod error;
pub mod events;
pub mod import;
pub mod job;
pub mod launcher;
pub mod metrics;
pub mod plots;
pub mod progress;
pub mod rendezvous;
pub mod reports;
pub mod restart;
pub mod run_dir;
pub mod service;
pub mod tensorboard;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use simclr_common::JobConfig;
use simclr_proto::client::RequireToken;
use simclr_proto::wire::coordinator_server::CoordinatorServer;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use error::CoordinatorError;
pub use job::{Job, JobEvent, JobOutcome};
pub use run_dir::RunDir;

/// A running coordinator: its gRPC server and the job driver.
/// The largest message the coordinator's service accepts or sends (the workers' client accepts as
/// much). Its biggest message, an assignment, takes about 150 bytes an image: some 400,000 images for
/// one rank. A larger request is refused (`OUT_OF_RANGE`) and the service goes on.
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// The job of the current attempt, swapped on a restart; the service, the metrics and the launchers
/// read it from here.
pub struct Jobs {
    current: tokio::sync::watch::Sender<Arc<Job>>,
}

impl Jobs {
    fn new(job: Arc<Job>) -> Arc<Jobs> {
        Arc::new(Jobs { current: tokio::sync::watch::Sender::new(job) })
    }

    /// The current attempt's job.
    pub fn get(&self) -> Arc<Job> {
        Arc::clone(&self.current.borrow())
    }

    /// Follows the attempts: the receiver sees each new job.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<Arc<Job>> {
        self.current.subscribe()
    }

    /// How often the job was restarted so far: the current attempt's number.
    pub fn restarts(&self) -> u32 {
        self.current.borrow().attempt
    }
}

pub struct Coordinator {
    pub addr: SocketAddr,
    pub jobs: Arc<Jobs>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    driver: Option<JoinHandle<JobOutcome>>,
    shutdown: CancellationToken,
    token: Option<String>,
    data: Option<Arc<data_plan::PreparedData>>,
}

/// How long the server keeps answering after the job ended, so that a worker's last heartbeat or
/// deregistration gets its answer instead of a connection error.
const LINGER: Duration = Duration::from_millis(300);

impl Coordinator {
    /// Starts serving on `listener` and driving the job. `config` must be validated, with its job id set
    /// (see `finalize_config`).
    /// `data`: the prepared dataset (`data_plan::prepare`), or `None` for a job without one.
    pub fn start(
        config: JobConfig,
        listener: TcpListener,
        token: Option<&str>,
        data: Option<data_plan::PreparedData>,
    ) -> Result<Coordinator, CoordinatorError> {
        let addr = listener
            .local_addr()
            .map_err(|source| CoordinatorError::Bind { addr: config.cluster.listen.clone(), source })?;
        let run_dir = RunDir::create(&run_dir_path(&config)).map_err(CoordinatorError::RunDir)?;
        run_dir.write_config(&config.to_toml()).map_err(CoordinatorError::RunDir)?;
        let data = data.map(Arc::new);
        let job = Job::new(config, token, run_dir, data.clone(), 0)
            .map_err(|e| CoordinatorError::Config(e.message().to_string()))?;
        let jobs = Jobs::new(Arc::clone(&job));
        let shutdown = CancellationToken::new();
        let service = tonic::service::interceptor::InterceptedService::new(
            CoordinatorServer::new(service::CoordinatorService { jobs: Arc::clone(&jobs) })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            RequireToken::new(token),
        );
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tokio::spawn(
            simclr_proto::tls::server_builder()
                .tcp_nodelay(true)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
        );
        tracing::info!(job = %job.job_id, %addr, run_dir = %job.run_dir().path().display(), world_size = job.config.cluster.world_size, "coordinator listening");
        let mut coordinator =
            Coordinator { addr, jobs, server, driver: None, shutdown, token: token.map(str::to_string), data };
        coordinator.drive(job);
        Ok(coordinator)
    }

    fn drive(&mut self, job: Arc<Job>) {
        tokio::spawn(tensorboard::follow(Arc::clone(&job)));
        self.driver = Some(tokio::spawn(job.drive()));
    }

    /// The current attempt's job.
    pub fn job(&self) -> Arc<Job> {
        self.jobs.get()
    }

    /// Waits for the current attempt to end.
    pub async fn outcome(&mut self) -> JobOutcome {
        let failed = |message: String| JobOutcome {
            status: simclr_common::ExitStatus::Internal,
            message,
            results_table: None,
            retryable: false,
        };
        match self.driver.as_mut() {
            Some(driver) => match driver.await {
                Ok(outcome) => outcome,
                Err(e) => failed(format!("job driver failed: {e}")),
            },
            None => failed("no job is running".into()),
        }
    }

    /// Starts the next attempt of the job on the same address and run directory: a new rendezvous
    /// (the whole group joins again, within `cluster.rendezvous_timeout_ms`), whose workers resume
    /// pretraining from the latest checkpoint and the sweep from the recorded probe results.
    /// `world_size`: a smaller group for the next attempt (elastic), each rank a larger slice of the same
    /// global batches.
    pub fn restart(&mut self, world_size: Option<u32>) -> Result<Arc<Job>, CoordinatorError> {
        let previous = self.jobs.get();
        let mut config = previous.config.clone();
        if let Some(n) = world_size {
            config.cluster.world_size = n;
            config.validate()?;
        }
        let attempt = previous.attempt + 1;
        let job = Job::new(config, self.token.as_deref(), previous.run_dir().clone(), self.data.clone(), attempt)
            .map_err(|e| CoordinatorError::Config(e.message().to_string()))?;
        tracing::warn!(job = %job.job_id, attempt, max_restarts = job.config.cluster.max_restarts, "restarting the job from its last checkpoint");
        self.jobs.current.send_replace(Arc::clone(&job));
        self.drive(Arc::clone(&job));
        Ok(job)
    }

    /// Stops the server (after a short linger for the workers' last calls).
    pub async fn close(self) {
        tokio::time::sleep(LINGER).await;
        self.shutdown.cancel();
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "coordinator server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "coordinator server task failed"),
        }
    }

    /// Waits for the job to end (this attempt, no restart), then stops the server.
    pub async fn wait(mut self) -> JobOutcome {
        let outcome = self.outcome().await;
        self.close().await;
        outcome
    }
}

/// The job's run directory: `job.run_dir`, else `runs/<job id>`.
pub fn run_dir_path(config: &JobConfig) -> std::path::PathBuf {
    config.job.run_dir.clone().unwrap_or_else(|| format!("runs/{}", config.job.id).into())
}

/// Fills in what the config leaves open: a job id from the start time.
pub fn finalize_config(mut config: JobConfig) -> JobConfig {
    if config.job.id.is_empty() {
        let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let digits: String = stamp.chars().filter(|c| c.is_ascii_digit()).collect();
        config.job.id = format!("job-{}-{}", &digits[..8], &digits[8..14]);
    }
    // Workers write checkpoints and the final encoder there too: give them a path that does not
    // depend on their working directory.
    let run_dir = run_dir_path(&config);
    config.job.run_dir = Some(std::path::absolute(&run_dir).unwrap_or(run_dir));
    // Without pretraining the encoder to probe is the one it would have started from.
    if !config.pretrain.enabled && config.probe.encoder.is_none() {
        config.probe.encoder = config.pretrain.init_weights.clone();
    }
    for path in [&mut config.probe.encoder, &mut config.pretrain.init_weights].into_iter().flatten() {
        *path = std::path::absolute(&*path).unwrap_or_else(|_| path.clone());
    }
    config
}
