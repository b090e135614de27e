//! `simclr-coordinator`: parses the command line, sets up logging and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use simclr_common::config::CollectiveBackend;
use simclr_common::launch_env;
use simclr_common::logging::{self, LogFormat};
use simclr_common::pretrain::BnMode;
use simclr_common::{ExitStatus, JobConfig, StopReason};
use simclr_coordinator::import::{ImportOptions, Normalisation, SourceFormat};
use simclr_coordinator::launcher::{self, LaunchOptions};
use simclr_coordinator::{
    data_plan, finalize_config, metrics, progress, restart, run_dir_path, Coordinator, CoordinatorError, JobOutcome,
    RunDir,
};
use simclr_data::pixels::{check_decode, DecodeOptions};
use simclr_data::synth::{write_dataset, SynthError, SynthOptions};
use tokio::signal::unix::{signal, Signal, SignalKind};

#[derive(Parser)]
#[command(name = "simclr-coordinator", version, about = "Coordinator of a simclr-cluster job")]
struct Cli {
    /// Log format: text or json (one object per line). Filter with RUST_LOG.
    #[arg(long, global = true, default_value = "text", env = "SIMCLR_LOG_FORMAT")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Single machine: start the coordinator, spawn N workers on 127.0.0.1 and run the whole job.
    Dev(DevArgs),
    /// The coordinator of a cluster job (Kubernetes, SLURM); workers join it over the network.
    Run(RunArgs),
    /// Write a synthetic dataset of chest-radiograph phantoms in the SIIM-FISABIO-RSNA Kaggle layout.
    Synth(SynthArgs),
    /// Check a dataset before a long job: counts, encodings, labels, and every unusable file with why.
    Inspect(InspectArgs),
    /// Turn a published encoder (torchvision, timm, Lightning, solo-learn, lightly, google-research/simclr's
    /// TensorFlow checkpoints) into this project's encoder file, for pretrain.init_weights or probe.encoder.
    ImportWeights(ImportArgs),
}

#[derive(Args)]
struct ImportArgs {
    /// Where the checkpoint comes from: torchvision, timm, lightning, solo-learn, lightly or simclr-tf.
    #[arg(long = "from", value_parser = parse_source_format)]
    from: SourceFormat,
    /// The checkpoint: a torch.save file (.pth, .pt, .ckpt; zip or legacy) or .safetensors; for simclr-tf
    /// a TensorFlow checkpoint prefix, its .index, a checkpoint directory or a SavedModel directory.
    #[arg(long = "in")]
    input: PathBuf,
    /// The encoder file to write (.safetensors).
    #[arg(long)]
    out: PathBuf,
    /// Key prefix of the encoder when the file holds several (e.g. "state_dict.momentum_backbone.").
    #[arg(long)]
    prefix: Option<String>,
    /// Refuse tensors under the encoder's prefix that are not the encoder's.
    #[arg(long)]
    strict: bool,
    /// Input normalisation the encoder expects: imagenet or none (default: the format's; imagenet, and
    /// none for simclr-tf).
    #[arg(long, value_parser = parse_normalisation)]
    input_normalisation: Option<Normalisation>,
}

fn parse_source_format(s: &str) -> Result<SourceFormat, String> {
    SourceFormat::parse(s).ok_or_else(|| format!("unknown format '{s}'; one of: {}", SourceFormat::NAMES))
}

fn parse_normalisation(s: &str) -> Result<Normalisation, String> {
    Normalisation::parse(s).ok_or_else(|| format!("unknown normalisation '{s}'; one of: imagenet, none"))
}

#[derive(Args)]
struct SynthArgs {
    /// Output directory (created).
    #[arg(long)]
    out: PathBuf,
    /// Number of studies.
    #[arg(long, default_value_t = 400)]
    studies: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Side of the written images in pixels.
    #[arg(long, default_value_t = 256)]
    size: usize,
}

#[derive(Args)]
struct InspectArgs {
    /// Dataset root.
    #[arg(long)]
    data: PathBuf,
    /// Also run every file through the pixel pipeline (slower; finds files whose pixels cannot be decoded).
    #[arg(long)]
    decode: bool,
    /// Write the summary and every unusable file as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Preprocessed image size for --decode.
    #[arg(long, default_value_t = 64)]
    image_size: u32,
    /// Colour images: reject (list them) or luminance (convert to grey), as data.color in a job.
    #[arg(long, value_enum, default_value_t = ColorArg::Reject)]
    color: ColorArg,
    /// Read data sets without a File Meta header, as data.accept_no_meta = true in a job.
    #[arg(long)]
    accept_no_meta: bool,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ColorArg {
    Reject,
    Luminance,
}

#[derive(Args)]
struct DevArgs {
    /// Number of worker processes (overrides cluster.world_size).
    #[arg(long)]
    workers: Option<u32>,
    /// Dataset root (overrides data.path); without it, the built-in synthetic dataset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Job config (TOML).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Run directory (overrides job.run_dir).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Seed (overrides job.seed).
    #[arg(long)]
    seed: Option<u64>,
    /// Where the workers compute: cpu, cuda (worker k on GPU k) or cuda:K (every worker on GPU K).
    #[arg(long, default_value = "cpu", value_parser = parse_dev_device)]
    device: String,
    /// Serve the job's metrics in Prometheus' text format at http://ADDR/metrics.
    #[arg(long, env = "SIMCLR_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// After a lost worker, restart with the workers that are left (the largest number that divides
    /// the global batch) instead of the whole group. The global batches stay the same (the epoch order
    /// does not depend on the world size), so the weights agree with an uninterrupted run's up to
    /// float summation order.
    #[arg(long)]
    elastic: bool,
    /// Spread the workers over this many simulated hosts (consecutive blocks of ranks): each host's
    /// workers listen on and advertise an address of their own (127.0.0.2, 127.0.0.3, ...), report a
    /// host name of their own (host-0, ...), keep a decode cache of their own and read the dataset
    /// through a mount of their own (a link under <run dir>/hosts/): what differs between the hosts
    /// of a real cluster, on one machine.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=250))]
    simulate_hosts: u32,
    #[command(flatten)]
    pretrain: PretrainOverrides,
}

fn parse_dev_device(spec: &str) -> Result<String, String> {
    let gpu = spec.strip_prefix("cuda:").is_some_and(|k| k.parse::<u32>().is_ok());
    if spec == "cpu" || spec == "cuda" || gpu {
        Ok(spec.to_string())
    } else {
        Err(format!("'{spec}' is not a device (expected cpu, cuda or cuda:K)"))
    }
}

/// Pretraining options every launcher can override on the command line (each is also a config key).
#[derive(Args)]
struct PretrainOverrides {
    /// Stop pretraining after this many steps in all (pretrain.max_steps; a debugging limit).
    #[arg(long)]
    max_steps: Option<u64>,
    /// Start the encoder from these torchvision-format safetensors weights (pretrain.init_weights).
    #[arg(long)]
    init_weights: Option<PathBuf>,
    /// Probe this encoder file (ours, or one written by import-weights) instead of the one pretraining
    /// writes (probe.encoder); with pretrain.enabled = false nothing is pretrained.
    #[arg(long)]
    probe_encoder: Option<PathBuf>,
    /// Turn augmentation off: every view is the plain resized image (pretrain.augment.enabled = false;
    /// a debugging switch to compare a step with an outside reference).
    #[arg(long)]
    no_augment: bool,
    /// BatchNorm statistics with several workers: sync (global batch) or local (pretrain.bn).
    #[arg(long, value_parser = ["sync", "local"])]
    bn: Option<String>,
    /// Arithmetic of the encoder and head: auto (bf16 on CUDA, fp32 on the CPU), fp32 (TF32 off),
    /// tf32 or bf16 (autocast; loss, weights and optimizer state stay float32) (pretrain.precision).
    #[arg(long, value_parser = ["auto", "fp32", "tf32", "bf16"])]
    precision: Option<String>,
    /// Collectives backend: auto (NCCL when every worker is on a CUDA device, else the TCP ring), tcp,
    /// grpc or nccl (cluster.collective).
    #[arg(long, value_parser = ["auto", "tcp", "grpc", "nccl"])]
    collective: Option<String>,
    /// Restarts from the last checkpoint after a retryable failure, a worker lost or killed
    /// (cluster.max_restarts; 0: none). Permanent failures (bad config, bad data) never restart.
    #[arg(long)]
    max_restarts: Option<u32>,
    /// Resume from the run directory's checkpoint although these keys of its training config differ
    /// from this run's, e.g. pretrain.epochs,pretrain.base_lr (pretrain.allow_config_change). Any other
    /// difference refuses the checkpoint, naming the keys.
    #[arg(long, value_delimiter = ',')]
    allow_config_change: Vec<String>,
}

impl PretrainOverrides {
    fn apply(&self, config: &mut JobConfig) {
        if let Some(n) = self.max_steps {
            config.pretrain.max_steps = n;
        }
        if let Some(path) = &self.init_weights {
            config.pretrain.init_weights = Some(std::path::absolute(path).unwrap_or_else(|_| path.clone()));
        }
        if let Some(path) = &self.probe_encoder {
            config.probe.encoder = Some(path.clone());
        }
        if self.no_augment {
            config.pretrain.augment.enabled = false;
        }
        match self.bn.as_deref() {
            Some("local") => config.pretrain.bn = BnMode::Local,
            Some("sync") => config.pretrain.bn = BnMode::Sync,
            _ => {}
        }
        if let Some(p) = self.precision.as_deref().and_then(|p| p.parse().ok()) {
            config.pretrain.precision = p;
        }
        if let Some(n) = self.max_restarts {
            config.cluster.max_restarts = n;
        }
        if !self.allow_config_change.is_empty() {
            config.pretrain.allow_config_change = self.allow_config_change.clone();
        }
        match self.collective.as_deref() {
            Some("auto") => config.cluster.collective = CollectiveBackend::Auto,
            Some("tcp") => config.cluster.collective = CollectiveBackend::Tcp,
            Some("grpc") => config.cluster.collective = CollectiveBackend::Grpc,
            Some("nccl") => config.cluster.collective = CollectiveBackend::Nccl,
            _ => {}
        }
    }
}

#[derive(Args)]
struct RunArgs {
    /// Job config (TOML).
    #[arg(long)]
    config: PathBuf,
    /// Address to listen on (overrides cluster.listen). Inside a SLURM job without this flag:
    /// 0.0.0.0 on the port the workers derive from SLURM_JOB_ID (20000 + job id mod 20000).
    #[arg(long)]
    listen: Option<String>,
    /// Number of workers (overrides cluster.world_size), e.g. "$SLURM_NTASKS" in an sbatch script.
    #[arg(long)]
    world_size: Option<u32>,
    /// Also serve the standard gRPC health service (grpc.health.v1, no token) on this address, for
    /// Kubernetes' liveness and readiness probes; it answers for as long as the process lives.
    #[arg(long, env = "SIMCLR_HEALTH_LISTEN")]
    health_listen: Option<std::net::SocketAddr>,
    /// After the job ends, stay up (and healthy) until SIGTERM or SIGINT, then exit with the job's
    /// status: under a Kubernetes Deployment, a finished coordinator is not restarted into a new job.
    #[arg(long)]
    linger: bool,
    /// Serve the job's metrics in Prometheus' text format at http://ADDR/metrics.
    #[arg(long, env = "SIMCLR_METRICS_LISTEN")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Dataset root (overrides data.path).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Run directory (overrides job.run_dir).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    #[command(flatten)]
    pretrain: PretrainOverrides,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("simclr-coordinator: cannot start the async runtime: {e}");
            return ExitCode::from(ExitStatus::Internal.code() as u8);
        }
    };
    let status = runtime.block_on(async {
        match cli.command {
            Command::Dev(args) => dev(args, cli.log_format).await,
            Command::Run(args) => run(args, cli.log_format).await,
            Command::Synth(args) => synth(args),
            Command::Inspect(args) => inspect(args),
            Command::ImportWeights(args) => import_weights(args),
        }
    });
    let status = status.unwrap_or_else(|e| {
        tracing::error!("{e}");
        e.exit_status()
    });
    ExitCode::from(status.code() as u8)
}

fn load_config(path: Option<&PathBuf>) -> Result<JobConfig, CoordinatorError> {
    Ok(match path {
        Some(path) => JobConfig::from_file(path)?,
        None => JobConfig::default(),
    })
}

/// Turns TLS on for this process when the config has a [tls] section; the worker flags that match it.
fn configure_tls(config: &JobConfig) -> Result<Vec<String>, CoordinatorError> {
    let tls = &config.tls;
    let (Some(ca), Some(cert), Some(key)) = (&tls.ca, &tls.cert, &tls.key) else {
        simclr_proto::tls::configure(None).map_err(CoordinatorError::Config)?;
        return Ok(Vec::new());
    };
    let absolute = |p: &PathBuf| std::path::absolute(p).unwrap_or_else(|_| p.clone());
    let files = simclr_proto::tls::TlsFiles {
        ca: absolute(ca),
        cert: absolute(cert),
        key: absolute(key),
        server_name: tls.server_name.clone(),
    };
    simclr_proto::tls::configure(Some(&files)).map_err(CoordinatorError::Config)?;
    tracing::info!(ca = %files.ca.display(), cert = %files.cert.display(), server_name = %files.server_name, "TLS on every gRPC link");
    Ok([("--tls-ca", &files.ca), ("--tls-cert", &files.cert), ("--tls-key", &files.key)]
        .into_iter()
        .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
        .chain(["--tls-server-name".to_string(), files.server_name.clone()])
        .collect())
}

/// The cluster token (SIMCLR_CLUSTER_TOKEN or the file SIMCLR_CLUSTER_TOKEN_FILE names).
fn token() -> Result<Option<String>, CoordinatorError> {
    simclr_common::cluster_token(&launch_env::process_env).map_err(CoordinatorError::Config)
}

async fn run(args: RunArgs, log_format: LogFormat) -> Result<ExitStatus, CoordinatorError> {
    let mut config = load_config(Some(&args.config))?;
    let from_launcher = launch_env::coordinator_listen(&launch_env::process_env)
        .map_err(|e| CoordinatorError::Config(e.to_string()))?;
    if let Some(listen) = args.listen {
        config.cluster.listen = listen;
    } else if let Some(listen) = from_launcher {
        tracing::info!(listen = %listen.value, source = %listen.source, "listen address from the launcher");
        config.cluster.listen = listen.value;
    }
    if let Some(n) = args.world_size {
        config.cluster.world_size = n;
    }
    if let Some(dir) = args.run_dir {
        config.job.run_dir = Some(dir);
    }
    if args.data.is_some() {
        config.data.path = args.data;
    }
    args.pretrain.apply(&mut config);
    config.validate()?;
    let started = std::time::Instant::now();
    let config = finalize_config(config);
    let usage_dir = run_dir_path(&config);
    configure_tls(&config)?;
    let data = prepare_data(&config)?;
    let listener = tokio::net::TcpListener::bind(&config.cluster.listen)
        .await
        .map_err(|source| CoordinatorError::Bind { addr: config.cluster.listen.clone(), source })?;
    let mut signals = Signals::new()?;
    if let Some(addr) = args.health_listen {
        simclr_proto::health::serve(addr).await.map_err(CoordinatorError::RunDir)?;
    }
    let mut coordinator = Coordinator::start(config, listener, token()?.as_deref(), Some(data))?;
    if let Some(addr) = args.metrics_listen {
        metrics::serve(addr, coordinator.jobs.clone()).await.map_err(CoordinatorError::RunDir)?;
    }
    let mut signalled = false;
    // Each attempt: the workers (their launcher restarts them: Kubernetes' restart policy, the sbatch
    // script's loop) join, run, and after a retryable failure join the next attempt.
    let outcome = restart::run_attempts(&mut coordinator, false, async |coordinator, job| {
        tokio::spawn(progress::show(job.clone(), log_format == LogFormat::Text));
        let outcome = {
            let mut wait = Box::pin(coordinator.outcome());
            loop {
                tokio::select! {
                    outcome = &mut wait => break outcome,
                    signal = signals.recv() => {
                        signalled = true;
                        cancel(&job, signal)
                    }
                }
            }
        };
        progress::clear();
        Ok(outcome)
    })
    .await?;
    coordinator.close().await;
    record_usage(&usage_dir, started);
    let status = report(outcome);
    if args.linger && !signalled {
        tracing::info!(%status, "job ended; staying up until SIGTERM or SIGINT (--linger)");
        signals.recv().await;
    }
    Ok(status)
}

async fn dev(args: DevArgs, log_format: LogFormat) -> Result<ExitStatus, CoordinatorError> {
    let mut config = load_config(args.config.as_ref())?;
    if let Some(n) = args.workers {
        config.cluster.world_size = n;
    }
    if let Some(seed) = args.seed {
        config.job.seed = seed;
    }
    if let Some(dir) = args.run_dir {
        config.job.run_dir = Some(dir);
    }
    if args.data.is_some() {
        config.data.path = args.data;
    }
    args.pretrain.apply(&mut config);
    config.cluster.listen = "127.0.0.1:0".into();
    config.validate()?;
    let started = std::time::Instant::now();
    let config = finalize_config(config);
    let usage_dir = run_dir_path(&config);
    let tls_args = configure_tls(&config)?;
    let data = prepare_data(&config)?;
    let data_root = data.root.clone();
    let hosts_dir = run_dir_path(&config).join("hosts");
    let worker_binary = launcher::find_worker_binary()?;
    let listener = tokio::net::TcpListener::bind(&config.cluster.listen)
        .await
        .map_err(|source| CoordinatorError::Bind { addr: config.cluster.listen.clone(), source })?;
    let grace = std::time::Duration::from_millis(config.cluster.shutdown_grace_ms);
    let workers = config.cluster.world_size;
    let mut signals = Signals::new()?;
    let mut coordinator = Coordinator::start(config, listener, token()?.as_deref(), Some(data))?;
    if let Some(addr) = args.metrics_listen {
        metrics::serve(addr, coordinator.jobs.clone()).await.map_err(CoordinatorError::RunDir)?;
    }
    let hosts = if args.simulate_hosts > 1 {
        if args.simulate_hosts > workers {
            return Err(CoordinatorError::Config(format!(
                "--simulate-hosts {} with {workers} workers: at most one host per worker",
                args.simulate_hosts
            )));
        }
        launcher::simulated_hosts(args.simulate_hosts, &hosts_dir, &data_root)?
    } else {
        Vec::new()
    };
    let mut options = LaunchOptions {
        hosts,
        worker_binary,
        workers,
        log_format: match log_format {
            LogFormat::Text => "text".into(),
            LogFormat::Json => "json".into(),
        },
        extra_args: tls_args,
        device: args.device.clone(),
    };
    // Each attempt: a fresh group of workers (as many as the attempt's job has: fewer after an elastic
    // restart); after a retryable failure (a worker died, a collective was cut off) the whole group goes
    // and a new one resumes from the last checkpoint.
    let outcome = restart::run_attempts(&mut coordinator, args.elastic, async |coordinator, job| {
        tokio::spawn(progress::show(job.clone(), log_format == LogFormat::Text));
        options.workers = job.config.cluster.world_size;
        let mut launched = match launcher::spawn_workers(coordinator.addr, &options) {
            Ok(launched) => launched,
            Err(e) => {
                job.abort(StopReason::Aborted, e.to_string(), e.exit_status());
                coordinator.outcome().await;
                return Err(e);
            }
        };
        let mut early_exits = Vec::new();
        let outcome = {
            let mut wait = Box::pin(coordinator.outcome());
            loop {
                tokio::select! {
                    outcome = &mut wait => break outcome,
                    signal = signals.recv() => cancel(&job, signal),
                    Some(exit) = launched.next_exit() => {
                        // A worker that ends before the stop notice can only have failed: declare it
                        // lost now rather than wait for its heartbeat to time out (which stops the job,
                        // except during the probe sweep, whose tasks go to the others).
                        if job.stop_notice().is_none() {
                            let message = format!("worker {} before the job finished", exit.describe());
                            if !job.declare_lost(exit.rank, message.clone()) {
                                job.abort(StopReason::Aborted, message, ExitStatus::JobAborted);
                            }
                        }
                        early_exits.push(exit);
                    }
                }
            }
        };
        let mut exits = launched.shut_down(grace).await;
        exits.extend(early_exits);
        exits.sort_by_key(|e| e.rank);
        for exit in &exits {
            if !exit.success() {
                tracing::warn!("worker {}", exit.describe());
            }
        }
        progress::clear();
        Ok(outcome)
    })
    .await;
    coordinator.close().await;
    record_usage(&usage_dir, started);
    progress::clear();
    Ok(report(outcome?))
}

/// Writes the coordinator's own CPU time and memory into the run directory (a failure is logged).
fn record_usage(run_dir: &std::path::Path, started: std::time::Instant) {
    let written = RunDir::create(run_dir).and_then(|d| d.write_coordinator_usage(started.elapsed().as_secs_f64()));
    if let Err(e) = written {
        tracing::warn!(error = %e, "cannot write coordinator.json");
    }
}

/// SIGINT and SIGTERM, watched from before the job starts so that neither kills the process outright.
struct Signals {
    interrupt: Signal,
    terminate: Signal,
}

impl Signals {
    fn new() -> Result<Signals, CoordinatorError> {
        let watch = |kind| signal(kind).map_err(CoordinatorError::RunDir);
        Ok(Signals { interrupt: watch(SignalKind::interrupt())?, terminate: watch(SignalKind::terminate())? })
    }

    /// The next signal's number.
    async fn recv(&mut self) -> i32 {
        tokio::select! {
            _ = self.interrupt.recv() => libc::SIGINT,
            _ = self.terminate.recv() => libc::SIGTERM,
        }
    }
}

fn cancel(job: &simclr_coordinator::Job, signal: i32) {
    let name = if signal == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
    job.abort(StopReason::Cancelled, format!("coordinator received {name}"), ExitStatus::Interrupted(signal));
}

/// Finds (or generates), indexes and splits the dataset, and writes its reports into the run directory.
fn prepare_data(config: &JobConfig) -> Result<data_plan::PreparedData, CoordinatorError> {
    let prepared = data_plan::prepare(&config.data, config.pretrain.enabled.then_some(config.pretrain.batch_size))?;
    let run_dir = RunDir::create(&run_dir_path(config)).map_err(CoordinatorError::RunDir)?;
    data_plan::write_reports(&prepared, &config.data, &run_dir)?;
    let split = &prepared.split;
    tracing::info!(
        root = %prepared.root.display(),
        synthetic = prepared.synthetic,
        studies = prepared.dataset.studies.len(),
        train_studies = split.train.len(),
        test_studies = split.test.len(),
        "dataset split at patient and study level"
    );
    Ok(prepared)
}

fn synth(args: SynthArgs) -> Result<ExitStatus, CoordinatorError> {
    let opts = SynthOptions { studies: args.studies, seed: args.seed, image_size: args.size };
    if !(16..=4096).contains(&args.size) {
        return Err(CoordinatorError::Config(format!("--size {} is out of range (16..=4096)", args.size)));
    }
    let started = std::time::Instant::now();
    let summary = write_dataset(&args.out, &opts).map_err(|e| match e {
        SynthError::NoStudies => CoordinatorError::Config(e.to_string()),
        other => CoordinatorError::Data(other.to_string()),
    })?;
    tracing::info!(
        out = %args.out.display(),
        studies = summary.studies,
        images = summary.images,
        patients = summary.patients,
        classes = ?summary.classes,
        encodings = ?summary.encodings,
        elapsed_s = started.elapsed().as_secs_f64(),
        "synthetic dataset written"
    );
    Ok(ExitStatus::Success)
}

fn import_weights(args: ImportArgs) -> Result<ExitStatus, CoordinatorError> {
    let options = ImportOptions {
        from: args.from,
        input: args.input,
        output: args.out,
        prefix: args.prefix,
        strict: args.strict,
        normalisation: args.input_normalisation,
    };
    let report = simclr_coordinator::import::import_weights(&options)?;
    if !report.leftovers.is_empty() {
        tracing::warn!(
            count = report.leftovers.len(),
            first = ?&report.leftovers[..report.leftovers.len().min(5)],
            "tensors under the encoder's prefix that are not the encoder's were left out (--strict refuses them)"
        );
    }
    tracing::info!(
        input = %options.input.display(),
        out = %options.output.display(),
        prefix = %report.prefix,
        arch = report.shape.arch,
        width = report.shape.width,
        variant = report.shape.variant.name(),
        input_channels = report.shape.in_channels,
        parameters = report.parameters,
        tensors = report.tensors,
        classifier = report.classifier,
        other_tensors_ignored = report.other_tensors,
        input_normalisation = report.normalisation.name(),
        "encoder imported"
    );
    Ok(ExitStatus::Success)
}

fn inspect(args: InspectArgs) -> Result<ExitStatus, CoordinatorError> {
    let color = match args.color {
        ColorArg::Reject => simclr_common::config::ColorMode::Reject,
        ColorArg::Luminance => simclr_common::config::ColorMode::Luminance,
    };
    let options = DecodeOptions { color, accept_no_meta: args.accept_no_meta };
    let mut dataset = data_plan::load(&args.data, options)?;
    if args.decode {
        let failed = check_decode(&args.data, &dataset.index.images, args.image_size, options);
        let failed: std::collections::BTreeMap<_, _> =
            failed.into_iter().map(|b| (b.path.clone(), (b.kind, b.reason))).collect();
        dataset.index.exclude(|image| failed.get(&image.path).cloned());
        // Studies refer to image positions: rebuild them over the images that decode.
        let labels =
            simclr_data::labels::LabelTable::load(&args.data).map_err(|e| CoordinatorError::Data(e.to_string()))?;
        dataset = simclr_data::dataset::Dataset::assemble(dataset.index, &labels);
    }
    let mut summary = data_plan::summarize(&args.data, false, &dataset, None, &[], None, &Default::default());
    // The task comes from a job's configuration, which inspect does not have.
    if let Some(fields) = summary.as_object_mut() {
        fields.remove("task");
        fields.remove("targets");
    }
    summary["decoded"] = serde_json::Value::Bool(args.decode);
    println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
    for bad in &dataset.index.bad {
        println!("unusable ({}): {}: {}", bad.kind.as_str(), bad.path.display(), bad.reason);
    }
    if let Some(path) = &args.json {
        summary["unusable"] = serde_json::to_value(&dataset.index.bad).unwrap_or_default();
        let text = serde_json::to_string_pretty(&summary).unwrap_or_default();
        std::fs::write(path, text + "\n").map_err(|e| {
            CoordinatorError::RunDir(std::io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display())))
        })?;
    }
    Ok(if dataset.index.bad.is_empty() { ExitStatus::Success } else { ExitStatus::DataError })
}

fn report(outcome: JobOutcome) -> ExitStatus {
    if let Some(table) = &outcome.results_table {
        println!("\n{table}");
    }
    if outcome.status == ExitStatus::Success {
        tracing::info!(message = %outcome.message, "job complete");
    } else {
        tracing::error!(message = %outcome.message, status = %outcome.status, "job failed");
    }
    outcome.status
}
