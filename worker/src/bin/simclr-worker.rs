//! `simclr-worker`: parses the command line, sets up logging and signal handling, and calls the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use simclr_common::logging::{self, LogFormat};
use simclr_common::{ExitStatus, TOKEN_ENV};
use simclr_worker::{Device, Interrupt, WorkerError, WorkerOptions};
use tokio::signal::unix::{signal, SignalKind};

#[derive(Parser)]
#[command(
    name = "simclr-worker",
    version,
    about = "Worker of a simclr-cluster job: joins the coordinator and computes"
)]
struct Cli {
    /// Coordinator address, e.g. http://10.0.0.1:50051 or 10.0.0.1:50051.
    #[arg(long, env = "SIMCLR_COORDINATOR")]
    coordinator: String,
    /// Device: cpu or cuda:K.
    #[arg(long, default_value = "cpu", env = "SIMCLR_DEVICE")]
    device: String,
    /// Rank decided by the launcher; unset: the coordinator assigns one.
    #[arg(long)]
    rank: Option<u32>,
    /// World size the launcher expects; the coordinator rejects a mismatch.
    #[arg(long)]
    world_size: Option<u32>,
    /// Job id the worker expects to join; the coordinator rejects a mismatch.
    #[arg(long, default_value = "")]
    job_id: String,
    /// Address the peer server listens on (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    peer_listen: SocketAddr,
    /// Host name or IP that peers dial; default: the listen IP, or the host name.
    #[arg(long)]
    advertise_host: Option<String>,
    /// How long to keep retrying an unreachable coordinator before giving up (exit 4).
    #[arg(long, default_value_t = 60_000)]
    connect_timeout_ms: u64,
    /// libtorch intra-op threads (0: libtorch's default, one per core). Dev mode gives each worker
    /// its share of the cores.
    #[arg(long, default_value_t = 0, env = "SIMCLR_THREADS")]
    threads: i32,
    /// Log format: text or json (one object per line). Filter with RUST_LOG.
    #[arg(long, default_value = "text", env = "SIMCLR_LOG_FORMAT")]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    if cli.threads > 0 {
        tch::set_num_threads(cli.threads);
    }
    let status = match options(&cli) {
        Ok(opts) => run(opts),
        Err(e) => Err(e),
    };
    let status = status.unwrap_or_else(|e| {
        tracing::error!("{e}");
        e.exit_status()
    });
    ExitCode::from(status.code() as u8)
}

fn options(cli: &Cli) -> Result<WorkerOptions, WorkerError> {
    if cli.world_size == Some(0) {
        return Err(WorkerError::Usage { flag: "--world-size", message: "must be at least 1".into() });
    }
    if let (Some(rank), Some(ws)) = (cli.rank, cli.world_size) {
        if rank >= ws {
            return Err(WorkerError::Usage {
                flag: "--rank",
                message: format!("{rank} is not below --world-size {ws}"),
            });
        }
    }
    Ok(WorkerOptions {
        coordinator: cli.coordinator.clone(),
        device: Device::parse(&cli.device)?,
        requested_rank: cli.rank,
        expected_world_size: cli.world_size,
        expected_job_id: cli.job_id.clone(),
        peer_listen: cli.peer_listen,
        advertise_host: cli.advertise_host.clone(),
        connect_timeout: Duration::from_millis(cli.connect_timeout_ms),
        token: std::env::var(TOKEN_ENV).ok().filter(|t| !t.is_empty()),
    })
}

fn run(opts: WorkerOptions) -> Result<ExitStatus, WorkerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Runtime(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        let interrupt = Interrupt::default();
        for (kind, number) in [(SignalKind::interrupt(), libc::SIGINT), (SignalKind::terminate(), libc::SIGTERM)] {
            let mut stream = signal(kind).map_err(|e| WorkerError::Runtime(format!("cannot watch signals: {e}")))?;
            let interrupt = interrupt.clone();
            tokio::spawn(async move {
                if stream.recv().await.is_some() {
                    interrupt.raise(number);
                }
            });
        }
        simclr_worker::run(opts, interrupt).await
    })
}
