//! The job config: one TOML file (every option of the command line can be set in it), validated once
//! at the edge. The coordinator writes the effective config into the run directory and hands the same
//! TOML to every worker at rendezvous, so both sides read it with these types.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::pretrain::PretrainSection;
use crate::probe::ProbeSection;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("config key `{key}` = {value}: {expected}")]
    Invalid { key: &'static str, value: String, expected: String },
}

impl ConfigError {
    /// A config error never goes away by retrying.
    pub fn retryable(&self) -> bool {
        match self {
            ConfigError::Read { .. } | ConfigError::Parse { .. } | ConfigError::Invalid { .. } => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct JobConfig {
    pub job: JobSection,
    pub cluster: ClusterSection,
    pub preflight: PreflightSection,
    pub data: DataSection,
    pub pretrain: PretrainSection,
    pub probe: ProbeSection,
    pub tls: TlsSection,
}

/// TLS on every gRPC link of the job (the coordinator's settings; each worker gives its own with
/// `--tls-ca`, `--tls-cert`, `--tls-key`, since it needs them before it can fetch this config). All
/// three paths or none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM file of the CA that signed every process's certificate.
    pub ca: Option<PathBuf>,
    /// PEM files of this process's certificate and private key.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The DNS name every certificate carries (processes dial each other by address).
    pub server_name: String,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection { ca: None, cert: None, key: None, server_name: "simclr-cluster".into() }
    }
}

impl TlsSection {
    pub fn enabled(&self) -> bool {
        self.cert.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct JobSection {
    /// Job id; empty: generated from the start time.
    pub id: String,
    /// Seed of every random choice of the job.
    pub seed: u64,
    /// Where results, logs and the effective config go; empty: `runs/<id>`.
    pub run_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    /// Number of workers the job waits for at rendezvous.
    pub world_size: u32,
    /// Address the coordinator listens on (`run` mode; dev mode always uses 127.0.0.1:0).
    pub listen: String,
    /// How long the coordinator waits for every worker to register.
    pub rendezvous_timeout_ms: u64,
    /// How often a worker sends a heartbeat.
    pub heartbeat_interval_ms: u64,
    /// A worker silent for this long is declared lost, and so is a coordinator to its workers.
    pub heartbeat_timeout_ms: u64,
    /// Deadline of one call between peers (and of the coordinator's check of a reported peer).
    pub peer_timeout_ms: u64,
    /// After a stop notice, how long the coordinator waits for workers to deregister.
    pub shutdown_grace_ms: u64,
    /// How long a collective (all-reduce, all-gather, ...) waits for a peer before failing the step.
    /// Generous: a peer may be writing a checkpoint or loading an epoch's images.
    pub collective_timeout_ms: u64,
    /// How the workers exchange tensors: `auto` picks NCCL when every worker runs on a CUDA device and
    /// the TCP ring otherwise.
    pub collective: CollectiveBackend,
    /// How often a failed job is restarted from its last checkpoint when the failure is retryable (a
    /// worker lost or killed, a collective cut off); a permanent failure (bad configuration, bad data)
    /// stops at once. Each restart waits for the whole group again (`rendezvous_timeout_ms`).
    pub max_restarts: u32,
}

/// The backend of the collectives (all-gather, all-reduce, ...) between workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum CollectiveBackend {
    /// NCCL if every worker's device is CUDA, the TCP ring otherwise.
    #[default]
    Auto,
    /// A ring of plain TCP connections between the workers, set up through the coordinator and
    /// authenticated with the cluster token (CPU tensors; GPU tensors go through host memory). The
    /// fastest CPU backend; needs one more port per worker (ephemeral, on the peer interface).
    Tcp,
    /// Peer to peer over the workers' gRPC endpoints, the one port they already serve (slower: HTTP/2
    /// framing and protobuf copies, see BENCHMARKS.md).
    Grpc,
    /// NVIDIA's collectives library, GPU to GPU (every worker on a CUDA device).
    Nccl,
}

impl CollectiveBackend {
    /// The backend a job uses, given every rank's host and device ("cpu" or "cuda:K"): `auto` is NCCL
    /// when every rank has a GPU of its own, else the TCP ring (NCCL refuses two ranks on one GPU).
    pub fn resolve<'a>(self, workers: impl IntoIterator<Item = (&'a str, &'a str)>) -> CollectiveBackend {
        match self {
            CollectiveBackend::Auto => {
                let workers: Vec<(&str, &str)> = workers.into_iter().collect();
                if workers.iter().all(|(_, d)| d.starts_with("cuda")) && shared_gpu(workers.iter().copied()).is_none() {
                    CollectiveBackend::Nccl
                } else {
                    CollectiveBackend::Tcp
                }
            }
            chosen => chosen,
        }
    }
}

/// The first two ranks (by position) that share a GPU: the same device on the same host.
pub fn shared_gpu<'a>(workers: impl IntoIterator<Item = (&'a str, &'a str)>) -> Option<(usize, usize)> {
    let mut seen = std::collections::HashMap::new();
    for (rank, (host, device)) in workers.into_iter().enumerate() {
        if !device.starts_with("cuda") {
            continue;
        }
        if let Some(&first) = seen.get(&(host, device)) {
            return Some((first, rank));
        }
        seen.insert((host, device), rank);
    }
    None
}

impl std::fmt::Display for CollectiveBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CollectiveBackend::Auto => "auto",
            CollectiveBackend::Tcp => "tcp",
            CollectiveBackend::Grpc => "grpc",
            CollectiveBackend::Nccl => "nccl",
        })
    }
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            world_size: 2,
            listen: "0.0.0.0:50051".to_string(),
            rendezvous_timeout_ms: 300_000,
            heartbeat_interval_ms: 1_000,
            heartbeat_timeout_ms: 10_000,
            peer_timeout_ms: 5_000,
            shutdown_grace_ms: 10_000,
            collective_timeout_ms: 120_000,
            collective: CollectiveBackend::Auto,
            max_restarts: 3,
        }
    }
}

/// The first phase of every job: each rank pings every other rank's peer endpoint, which proves the
/// peer table works before any long computation, and measures round-trip times.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PreflightSection {
    /// Ping rounds per peer; the report gives the median and the maximum round trip.
    pub rounds: u32,
    /// Pause between rounds.
    pub interval_ms: u64,
    /// Bytes echoed per ping (0: latency only).
    pub payload_bytes: u32,
}

impl Default for PreflightSection {
    fn default() -> Self {
        PreflightSection { rounds: 5, interval_ms: 0, payload_bytes: 0 }
    }
}

/// The dataset: where it is, how images are preprocessed, labelled, split and ordered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    /// Dataset root (SIIM Kaggle layout, a tree with labels.csv, or an unlabelled tree); empty: the
    /// built-in synthetic dataset, generated once into the cache directory.
    pub path: Option<PathBuf>,
    /// Size of the synthetic dataset, when `path` is empty.
    pub synthetic_studies: usize,
    /// Side in pixels of the synthetic images as written.
    pub synthetic_size: usize,
    /// Side in pixels of the preprocessed images; unset: `pretrain.input_size`, so that the model sees
    /// the images at the resolution they are stored at (configs/report.toml keeps the reference
    /// experiment's 64 px fed at 224).
    pub image_size: Option<u32>,
    /// Label column the probes learn (SIIM: `Typical Appearance`, as the reference did).
    pub target: String,
    /// Learn every label column at once instead of `target`.
    pub multi_label: bool,
    /// Share of studies held out for testing (the reference used 85/15).
    pub test_fraction: f64,
    /// Share of the remaining studies held out for validation: probe configurations are chosen on it,
    /// so the test split informs no choice. Patient-level like the test split; 0: no validation side.
    pub validation_fraction: f64,
    /// Seed of the split (and of the synthetic dataset), independent of `job.seed`: pretraining runs
    /// with different seeds are compared on the same studies.
    pub split_seed: u64,
    /// What to do with files that cannot be used: `skip` (list them in the run directory) or `fail`.
    pub on_bad_file: OnBadFile,
    /// What happens to the last partial global batch of an epoch: `drop` or `pad`.
    pub shard_policy: ShardPolicy,
    /// Colour images (RGB, YBR): `reject` (listed as unusable) or `luminance` (converted to grey).
    pub color: ColorMode,
    /// Read data sets that have no DICOM File Meta header (ACR-NEMA-style files), as implicit VR
    /// little endian; otherwise such files are listed as unusable.
    pub accept_no_meta: bool,
}

impl Default for DataSection {
    fn default() -> Self {
        DataSection {
            path: None,
            synthetic_studies: 400,
            synthetic_size: 256,
            image_size: None,
            target: "Typical Appearance".into(),
            multi_label: false,
            test_fraction: 0.15,
            validation_fraction: 0.15,
            split_seed: 0,
            on_bad_file: OnBadFile::Skip,
            shard_policy: ShardPolicy::Drop,
            color: ColorMode::Reject,
            accept_no_meta: false,
        }
    }
}

/// What happens to colour images (Samples per Pixel 3: RGB, YBR_FULL, YBR_FULL_422, and the
/// RGB that JPEG / JPEG 2000 decoders return for YBR_RCT, YBR_ICT and YBR_PARTIAL_420).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColorMode {
    /// Listed as unusable at index time: a chest radiograph is monochrome, a colour file in the
    /// folder is usually a screenshot, a report or a secondary capture.
    #[default]
    Reject,
    /// Converted to grey: YBR to RGB as PS3.3 C.7.6.3.1.2 defines it, then ITU-R BT.601 luma
    /// (0.299 R + 0.587 G + 0.114 B), over the stored range.
    Luminance,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnBadFile {
    Skip,
    Fail,
}

/// What happens to the training images left over when the epoch's global order does not fill a
/// whole number of global batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ShardPolicy {
    /// The last partial batch sits this epoch out (a different few images each epoch, as the order is
    /// reshuffled). No image is seen twice in an epoch.
    Drop,
    /// The last batch is completed with the first images of the order, again (each with views of its
    /// own, drawn for its second occurrence).
    Pad,
}

/// Largest cluster we plan for; a bigger value is almost certainly a typo.
const MAX_WORLD_SIZE: u32 = 4096;

impl JobConfig {
    /// Side of the preprocessed images: `data.image_size`, or else `pretrain.input_size`.
    pub fn image_size(&self) -> u32 {
        self.data.image_size.unwrap_or(u32::try_from(self.pretrain.input_size).unwrap_or(224))
    }

    pub fn from_file(path: &Path) -> Result<JobConfig, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::from_toml(&text, &path.display().to_string())
    }

    /// Parses and validates; `origin` names the source in errors (a file path, "from the coordinator").
    pub fn from_toml(text: &str, origin: &str) -> Result<JobConfig, ConfigError> {
        let mut config: JobConfig = toml::from_str(text)
            .map_err(|e| ConfigError::Parse { origin: origin.to_string(), message: e.to_string() })?;
        config.pretrain.seed = config.job.seed;
        config.validate()?;
        Ok(config)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("JobConfig always serialises to TOML")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let c = &self.cluster;
        if c.world_size == 0 || c.world_size > MAX_WORLD_SIZE {
            return Err(invalid("cluster.world_size", c.world_size, format!("expected 1..={MAX_WORLD_SIZE}")));
        }
        if c.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid("cluster.listen", &c.listen, "expected IP:PORT, e.g. 0.0.0.0:50051".into()));
        }
        for (key, value) in [
            ("cluster.rendezvous_timeout_ms", c.rendezvous_timeout_ms),
            ("cluster.heartbeat_interval_ms", c.heartbeat_interval_ms),
            ("cluster.peer_timeout_ms", c.peer_timeout_ms),
            ("cluster.collective_timeout_ms", c.collective_timeout_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, value, "expected a positive number of milliseconds".into()));
            }
        }
        if c.heartbeat_timeout_ms < 2 * c.heartbeat_interval_ms {
            return Err(invalid(
                "cluster.heartbeat_timeout_ms",
                c.heartbeat_timeout_ms,
                format!(
                    "expected at least twice cluster.heartbeat_interval_ms ({}), or one late heartbeat loses a worker",
                    c.heartbeat_interval_ms
                ),
            ));
        }
        if !self.job.id.is_empty() && !self.job.id.chars().all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch)) {
            return Err(invalid("job.id", &self.job.id, "expected letters, digits, '-', '_' or '.'".into()));
        }
        let d = &self.data;
        if !(d.test_fraction > 0.0 && d.test_fraction < 1.0) {
            return Err(invalid(
                "data.test_fraction",
                d.test_fraction,
                "expected a number between 0 and 1, e.g. 0.15".into(),
            ));
        }
        if !(0.0..1.0).contains(&d.validation_fraction) {
            return Err(invalid(
                "data.validation_fraction",
                d.validation_fraction,
                "expected a number in [0, 1), e.g. 0.15 (0: no validation side)".into(),
            ));
        }
        if let Some(size) = d.image_size.filter(|s| !(8..=4096).contains(s)) {
            return Err(invalid("data.image_size", size, "expected 8..=4096 pixels".into()));
        }
        if d.synthetic_studies == 0 {
            return Err(invalid("data.synthetic_studies", d.synthetic_studies, "expected at least 1".into()));
        }
        if !(16..=4096).contains(&d.synthetic_size) {
            return Err(invalid("data.synthetic_size", d.synthetic_size, "expected 16..=4096 pixels".into()));
        }
        if !d.multi_label && d.target.is_empty() {
            return Err(invalid("data.target", "\"\"", "expected a label column, or data.multi_label = true".into()));
        }
        if self.preflight.payload_bytes > 64 << 20 {
            return Err(invalid(
                "preflight.payload_bytes",
                self.preflight.payload_bytes,
                "expected at most 64 MiB".into(),
            ));
        }
        let tls = &self.tls;
        match (&tls.ca, &tls.cert, &tls.key) {
            (None, None, None) | (Some(_), Some(_), Some(_)) => {}
            _ => {
                let key = if tls.ca.is_none() {
                    "tls.ca"
                } else if tls.cert.is_none() {
                    "tls.cert"
                } else {
                    "tls.key"
                };
                return Err(invalid(key, "(unset)", "expected tls.ca, tls.cert and tls.key together, or none".into()));
            }
        }
        if tls.enabled() && c.collective == CollectiveBackend::Tcp {
            return Err(invalid(
                "cluster.collective",
                "\"tcp\"",
                "the TCP ring has no TLS: with [tls], use grpc (auto picks it on CPU workers) or nccl".into(),
            ));
        }
        self.pretrain.validate(c.world_size)?;
        self.probe.validate()
    }
}

pub(crate) fn invalid(key: &'static str, value: impl std::fmt::Display, expected: String) -> ConfigError {
    ConfigError::Invalid { key, value: value.to_string(), expected }
}

#[cfg(test)]
mod tests {

    /// The documented config (docs/configuration.md: every key with its default) is a valid config equal
    /// to the defaults in every section, and names every section.
    #[test]
    fn the_documented_config_block_parses_to_the_defaults() {
        let page = include_str!("../../docs/configuration.md");
        let start = page.find("```toml\n").expect("a toml block in docs/configuration.md") + "```toml\n".len();
        let block = &page[start..start + page[start..].find("```").expect("its end")];
        let config = JobConfig::from_toml(block, "docs/configuration.md").expect("the documented config parses");
        config.validate().expect("the documented config is valid");
        assert_eq!(config, JobConfig::default());
        let documented: toml::Table = toml::from_str(block).unwrap();
        let toml::Value::Table(all) = toml::Value::try_from(JobConfig::default()).unwrap() else { unreachable!() };
        for section in all.keys() {
            assert!(documented.contains_key(section), "docs/configuration.md does not show [{section}]");
        }
    }

    use super::*;

    #[test]
    fn auto_picks_nccl_only_when_every_rank_has_a_gpu() {
        use CollectiveBackend::*;
        assert_eq!(Auto.resolve([("a", "cuda:0"), ("a", "cuda:1")]), Nccl);
        assert_eq!(Auto.resolve([("a", "cuda:0"), ("b", "cuda:0")]), Nccl);
        // Two ranks on one GPU: NCCL would refuse them (seen on an H200: ncclInvalidUsage).
        assert_eq!(Auto.resolve([("a", "cuda:0"), ("b", "cuda:0"), ("a", "cuda:0")]), Tcp);
        assert_eq!(shared_gpu([("a", "cuda:0"), ("b", "cuda:0"), ("a", "cuda:0")]), Some((0, 2)));
        assert_eq!(shared_gpu([("a", "cpu"), ("a", "cpu")]), None);
        assert_eq!(Auto.resolve([("a", "cuda:0"), ("a", "cpu")]), Tcp);
        assert_eq!(Auto.resolve([("a", "cpu")]), Tcp);
        assert_eq!(Grpc.resolve([("a", "cuda:0"), ("a", "cuda:1")]), Grpc);
        assert_eq!(Nccl.resolve([("a", "cpu")]), Nccl);
        let config = JobConfig::from_toml("[cluster]\ncollective = \"nccl\"\n", "test").unwrap();
        assert_eq!(config.cluster.collective, Nccl);
        let e = JobConfig::from_toml("[cluster]\ncollective = \"mpi\"\n", "test").unwrap_err();
        assert!(e.to_string().contains("mpi"), "{e}");
    }

    #[test]
    fn defaults_are_valid_and_round_trip_through_toml() {
        let config = JobConfig::default();
        config.validate().unwrap();
        assert_eq!(JobConfig::from_toml(&config.to_toml(), "test").unwrap(), config);
    }

    #[test]
    fn the_image_size_follows_the_model_input_unless_set() {
        let config = JobConfig::from_toml("[pretrain]\ninput_size = 96\n", "t").unwrap();
        assert_eq!(config.image_size(), 96);
        let report = JobConfig::from_toml("[data]\nimage_size = 64\n[pretrain]\ninput_size = 224\n", "t").unwrap();
        assert_eq!(report.image_size(), 64);
        assert_eq!(JobConfig::default().image_size(), 224);
        let err = JobConfig::from_toml("[data]\nvalidation_fraction = 1.0\n", "t").unwrap_err();
        assert!(err.to_string().contains("data.validation_fraction"), "{err}");
    }

    #[test]
    fn the_shipped_configs_parse() {
        for (name, text) in [
            ("demo.toml", include_str!("../../configs/demo.toml")),
            ("demo_large_test.toml", include_str!("../../configs/demo_large_test.toml")),
            ("report.toml", include_str!("../../configs/report.toml")),
            ("gpu_check.toml", include_str!("../../configs/gpu_check.toml")),
            ("gpu_bench.toml", include_str!("../../configs/gpu_bench.toml")),
        ] {
            let config = JobConfig::from_toml(text, name).unwrap_or_else(|e| panic!("{name}: {e}"));
            if name == "report.toml" {
                assert_eq!((config.image_size(), config.pretrain.input_size), (64, 224));
            } else {
                assert_eq!(i64::from(config.image_size()), config.pretrain.input_size, "{name}");
            }
        }
    }

    #[test]
    fn the_large_test_demo_is_the_demo_with_another_split() {
        let demo = JobConfig::from_toml(include_str!("../../configs/demo.toml"), "demo.toml").unwrap();
        let mut large =
            JobConfig::from_toml(include_str!("../../configs/demo_large_test.toml"), "demo_large_test.toml").unwrap();
        assert_eq!((large.data.synthetic_studies, large.data.test_fraction), (2000, 0.5));
        large.job.id = demo.job.id.clone();
        large.data.synthetic_studies = demo.data.synthetic_studies;
        large.data.test_fraction = demo.data.test_fraction;
        large.data.validation_fraction = demo.data.validation_fraction;
        assert_eq!(large, demo);
    }

    #[test]
    fn fixture_pins_the_format() {
        let text = include_str!("../tests/fixtures/job.toml");
        let config = JobConfig::from_toml(text, "fixture").unwrap();
        assert_eq!(config.job.id, "cxr-pretrain-01");
        assert_eq!(config.job.seed, 7);
        assert_eq!(config.cluster.world_size, 4);
        assert_eq!(config.cluster.heartbeat_timeout_ms, 5_000);
        assert_eq!(config.preflight.rounds, 3);
        assert_eq!(config.data.path.as_deref(), Some(Path::new("/data/siim-covid19")));
        assert_eq!((config.data.on_bad_file, config.data.shard_policy), (OnBadFile::Fail, ShardPolicy::Pad));
        let err = JobConfig::from_toml("[data]\non_bad_file = \"ignore\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("ignore") && err.to_string().contains("skip"), "{err}");
        // Keys absent from the file keep their defaults.
        assert_eq!(config.cluster.peer_timeout_ms, ClusterSection::default().peer_timeout_ms);
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = JobConfig::from_toml("[cluster]\nworld_sise = 3\n", "bad.toml").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("world_sise") && msg.contains("bad.toml"), "{msg}");
    }

    #[test]
    fn invalid_values_name_the_key() {
        let err = JobConfig::from_toml("[cluster]\nworld_size = 0\n", "t").unwrap_err();
        assert!(err.to_string().contains("cluster.world_size"), "{err}");
        let err = JobConfig::from_toml("[cluster]\nheartbeat_interval_ms = 1000\nheartbeat_timeout_ms = 1500\n", "t")
            .unwrap_err();
        assert!(err.to_string().contains("cluster.heartbeat_timeout_ms"), "{err}");
        let err = JobConfig::from_toml("[cluster]\nlisten = \"nowhere\"\n", "t").unwrap_err();
        assert!(err.to_string().contains("cluster.listen"), "{err}");
        assert!(!err.retryable());
    }
}
