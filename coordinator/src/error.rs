//! Errors of the coordinator process, each mapped to an exit status.

use simclr_common::{ConfigError, ExitStatus};

#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    #[error(transparent)]
    ConfigFile(#[from] ConfigError),
    #[error("bad configuration: {0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("{0}")]
    RunDir(std::io::Error),
    #[error("cannot start worker process {binary}: {source}")]
    Spawn { binary: String, source: std::io::Error },
    #[error("cannot find the worker binary: {0}")]
    WorkerBinary(String),
    #[error("dataset: {0}")]
    Data(String),
    #[error("import-weights: {0}")]
    Import(#[from] crate::import::ImportError),
}

impl CoordinatorError {
    pub fn retryable(&self) -> bool {
        match self {
            CoordinatorError::Bind { .. } => true,
            CoordinatorError::ConfigFile(_)
            | CoordinatorError::Config(_)
            | CoordinatorError::RunDir(_)
            | CoordinatorError::Spawn { .. }
            | CoordinatorError::WorkerBinary(_)
            | CoordinatorError::Data(_)
            | CoordinatorError::Import(_) => false,
        }
    }

    pub fn exit_status(&self) -> ExitStatus {
        match self {
            CoordinatorError::ConfigFile(_) | CoordinatorError::Config(_) | CoordinatorError::WorkerBinary(_) => {
                ExitStatus::Usage
            }
            CoordinatorError::Bind { .. } | CoordinatorError::RunDir(_) | CoordinatorError::Spawn { .. } => {
                ExitStatus::TaskFailed
            }
            CoordinatorError::Data(_) | CoordinatorError::Import(_) => ExitStatus::DataError,
        }
    }
}
