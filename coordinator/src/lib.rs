//! The coordinator of a simclr-cluster job: rendezvous, liveness, the job's phases, the run directory,
//! and the dev-mode launcher that spawns workers on one machine. Never links libtorch (ARCHITECTURE.md,
//! invariant 6); everything that touches tensors lives in the worker.

pub mod data_plan;
pub mod error;
pub mod job;
pub mod launcher;
pub mod metrics;
pub mod plots;
pub mod progress;
pub mod rendezvous;
pub mod reports;
pub mod run_dir;
pub mod service;
pub mod sweep;
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

pub struct Coordinator {
    pub addr: SocketAddr,
    pub job: Arc<Job>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    driver: JoinHandle<JobOutcome>,
    shutdown: CancellationToken,
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
        let job =
            Job::new(config, token, run_dir, data).map_err(|e| CoordinatorError::Config(e.message().to_string()))?;
        let shutdown = CancellationToken::new();
        let service = tonic::service::interceptor::InterceptedService::new(
            CoordinatorServer::new(service::CoordinatorService { job: Arc::clone(&job) })
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
            RequireToken::new(token),
        );
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .tcp_nodelay(true)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, shutdown.clone().cancelled_owned()),
        );
        tokio::spawn(tensorboard::follow(Arc::clone(&job)));
        let driver = tokio::spawn(Arc::clone(&job).drive());
        tracing::info!(job = %job.job_id, %addr, run_dir = %job.run_dir().path().display(), world_size = job.config.cluster.world_size, "coordinator listening");
        Ok(Coordinator { addr, job, server, driver, shutdown })
    }

    /// Waits for the job to end, then stops the server.
    pub async fn wait(self) -> JobOutcome {
        let outcome = match self.driver.await {
            Ok(outcome) => outcome,
            Err(e) => JobOutcome {
                status: simclr_common::ExitStatus::Internal,
                message: format!("job driver failed: {e}"),
                results_table: None,
            },
        };
        tokio::time::sleep(LINGER).await;
        self.shutdown.cancel();
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "coordinator server ended with an error"),
            Err(e) => tracing::warn!(error = %e, "coordinator server task failed"),
        }
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
    config
}
