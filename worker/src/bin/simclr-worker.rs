//! `simclr-worker`: parses the command line, sets up logging and signal handling, and calls the library.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use simclr_common::launch_env::{self, Placement, Sourced};
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
    /// Coordinator address, e.g. http://10.0.0.1:50051 or 10.0.0.1:50051. Unset: from the launcher
    /// (torchrun's MASTER_ADDR/MASTER_PORT, or the first host of a SLURM job on a port derived from
    /// its job id).
    #[arg(long, env = "SIMCLR_COORDINATOR")]
    coordinator: Option<String>,
    /// Device: cpu, cuda:K, or auto (cuda:<local rank> when CUDA is present, else cpu).
    #[arg(long, default_value = "auto", env = "SIMCLR_DEVICE")]
    device: String,
    /// Rank decided by the launcher (else RANK, SLURM_PROCID or JOB_COMPLETION_INDEX); unset
    /// everywhere: the coordinator assigns one.
    #[arg(long)]
    rank: Option<u32>,
    /// World size the launcher expects (else WORLD_SIZE, SLURM_NTASKS or SIMCLR_WORLD_SIZE); the
    /// coordinator rejects a mismatch.
    #[arg(long)]
    world_size: Option<u32>,
    /// This worker's index on its node (else LOCAL_RANK or SLURM_LOCALID): picks the GPU of
    /// `--device auto`.
    #[arg(long)]
    local_rank: Option<u32>,
    /// Job id the worker expects to join; the coordinator rejects a mismatch.
    #[arg(long, default_value = "")]
    job_id: String,
    /// Address the peer server listens on (port 0: any free port).
    #[arg(long, default_value = "0.0.0.0:0")]
    peer_listen: SocketAddr,
    /// Host name or IP that peers dial; default: the listen IP, or the host name.
    #[arg(long)]
    advertise_host: Option<String>,
    /// The host this worker reports to the coordinator (placement, logs); default: the machine's
    /// host name. Dev mode's simulated hosts set it.
    #[arg(long)]
    host_name: Option<String>,
    /// FROM=TO: the dataset is mounted at TO on this host where the coordinator names FROM (a
    /// dataset root under FROM is read under TO).
    #[arg(long, env = "SIMCLR_DATA_MOUNT", value_parser = parse_mount)]
    data_mount: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Also serve the standard gRPC health service (grpc.health.v1, no token) on this address, for
    /// Kubernetes' liveness and readiness probes.
    #[arg(long, env = "SIMCLR_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,
    /// Read images only under this directory: an assignment whose dataset root lies outside it is
    /// refused (image paths that climb out of the root are refused in any case).
    #[arg(long, env = "SIMCLR_DATA_ROOT")]
    data_root: Option<std::path::PathBuf>,
    /// TLS on every link (all three, or none): PEM files of the job's CA and of this worker's
    /// certificate and key. The coordinator and every worker must agree.
    #[arg(long, env = "SIMCLR_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    #[arg(long, env = "SIMCLR_TLS_CERT")]
    tls_cert: Option<std::path::PathBuf>,
    #[arg(long, env = "SIMCLR_TLS_KEY")]
    tls_key: Option<std::path::PathBuf>,
    /// The DNS name the certificates carry (the config's tls.server_name).
    #[arg(long, default_value = simclr_proto::tls::DEFAULT_SERVER_NAME, env = "SIMCLR_TLS_SERVER_NAME")]
    tls_server_name: String,
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
    /// Small collectives on the CPU backends: auto (Bruck's all-gather in log2 of the ranks' steps for
    /// small all-gathers and all-reduces, BatchNorm groups' exchanges within the group) or ring (the
    /// ring always, groups' exchanges over the whole world; for before/after benchmarks). Every worker
    /// of a job must use the same.
    #[arg(long, value_enum, default_value = "auto", env = "SIMCLR_COLLECTIVE_ALGORITHM")]
    collective_algorithm: CollectiveAlgorithm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum CollectiveAlgorithm {
    Auto,
    Ring,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    if cli.threads > 0 {
        tch::set_num_threads(cli.threads);
    }
    simclr_worker::comm::set_latency_algorithms(cli.collective_algorithm == CollectiveAlgorithm::Auto);
    let status = match options(&cli) {
        Ok(opts) => run(opts, cli.health_listen),
        Err(e) => Err(e),
    };
    let status = status.unwrap_or_else(|e| {
        tracing::error!("{e}");
        e.exit_status()
    });
    ExitCode::from(status.code() as u8)
}

fn options(cli: &Cli) -> Result<WorkerOptions, WorkerError> {
    let tls = match (&cli.tls_ca, &cli.tls_cert, &cli.tls_key) {
        (None, None, None) => None,
        (Some(ca), Some(cert), Some(key)) => Some(simclr_proto::tls::TlsFiles {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
            server_name: cli.tls_server_name.clone(),
        }),
        _ => {
            return Err(WorkerError::Usage {
                flag: "--tls-cert",
                message: "give --tls-ca, --tls-cert and --tls-key together (or SIMCLR_TLS_CA, _CERT, _KEY), or none"
                    .into(),
            })
        }
    };
    simclr_proto::tls::configure(tls.as_ref()).map_err(|message| WorkerError::Usage { flag: "--tls-cert", message })?;
    if cli.world_size == Some(0) {
        return Err(WorkerError::Usage { flag: "--world-size", message: "must be at least 1".into() });
    }
    let flags = Placement {
        rank: cli.rank.map(|r| Sourced::new(r, "--rank")),
        world_size: cli.world_size.map(|w| Sourced::new(w, "--world-size")),
        local_rank: cli.local_rank.map(|l| Sourced::new(l, "--local-rank")),
        coordinator: cli.coordinator.clone().map(|c| Sourced::new(c, "--coordinator")),
    };
    let placement = launch_env::discover(&flags, &launch_env::process_env)
        .map_err(|e| WorkerError::Usage { flag: "--rank", message: e.to_string() })?;
    if placement.world_size() == Some(0) {
        return Err(WorkerError::Usage { flag: "--world-size", message: "the launcher's world size is 0".into() });
    }
    let coordinator = placement.coordinator().map(str::to_string).ok_or(WorkerError::Usage {
        flag: "--coordinator",
        message: "no coordinator address: pass --coordinator (or SIMCLR_COORDINATOR), or start the worker under \
                  torchrun (MASTER_ADDR) or in a SLURM job"
            .into(),
    })?;
    let device = match cli.device.as_str() {
        "auto" => Device::parse(&placement.default_device(Device::cuda_count()))?,
        spec => Device::parse(spec)?,
    };
    Ok(WorkerOptions {
        coordinator,
        device,
        requested_rank: placement.rank(),
        expected_world_size: placement.world_size(),
        expected_job_id: cli.job_id.clone(),
        peer_listen: cli.peer_listen,
        advertise_host: cli.advertise_host.clone(),
        connect_timeout: Duration::from_millis(cli.connect_timeout_ms),
        token: simclr_common::cluster_token(&launch_env::process_env)
            .map_err(|message| WorkerError::Usage { flag: TOKEN_ENV, message })?,
        data_root_limit: cli.data_root.as_ref().map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone())),
        host_name: cli.host_name.clone(),
        data_mount: cli.data_mount.clone(),
    })
}

/// `--data-mount FROM=TO`, both absolute.
fn parse_mount(spec: &str) -> Result<(std::path::PathBuf, std::path::PathBuf), String> {
    let (from, to) = spec.split_once('=').ok_or_else(|| format!("'{spec}' is not FROM=TO"))?;
    let (from, to) = (std::path::PathBuf::from(from), std::path::PathBuf::from(to));
    if !from.is_absolute() || !to.is_absolute() {
        return Err(format!("'{spec}': both paths must be absolute"));
    }
    Ok((from, to))
}

fn run(opts: WorkerOptions, health_listen: Option<SocketAddr>) -> Result<ExitStatus, WorkerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Runtime(format!("cannot start the async runtime: {e}")))?;
    runtime.block_on(async {
        if let Some(addr) = health_listen {
            simclr_proto::health::serve(addr).await.map_err(|e| WorkerError::Runtime(e.to_string()))?;
        }
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
