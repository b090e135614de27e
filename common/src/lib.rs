//! Pure-Rust pieces that both binaries share: the job config and its validation, the domain types of
//! cluster membership, exit codes, logging set-up and retry with backoff. Must never depend on libtorch:
//! the coordinator links it.

pub mod config;
pub mod exit;
pub mod launch_env;
pub mod logging;
pub mod membership;
pub mod metrics;
pub mod pretrain;
pub mod probe;
pub mod retry;

pub use config::{ConfigError, JobConfig};
pub use exit::ExitStatus;
pub use membership::{PeerTable, StopNotice, StopReason, WorkerIdentity};

/// The phases every worker runs after rendezvous, in order; the coordinator advances through them once
/// every rank has finished the current one. Later stages of the pipeline (pretraining, broadcast, probe
/// sweep) append theirs here.
pub const PHASES: &[&str] = &["preflight", "decode", "pretrain", "probe"];

/// Version of this build, sent at registration so that mixed deployments are caught at rendezvous.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Environment variable holding the cluster token; when set, every call between the processes of a job
/// must carry it.
pub const TOKEN_ENV: &str = "SIMCLR_CLUSTER_TOKEN";
