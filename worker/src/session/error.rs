//! Errors of the worker process, each mapped to an exit status.

use simclr_common::ExitStatus;

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("bad flag {flag}: {message}")]
    Usage { flag: &'static str, message: String },
    #[error("device {device}: {message}")]
    Device { device: String, message: String },
    #[error("cannot listen for peers on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("could not reach the coordinator at {addr} after {attempts} attempts over {waited_s:.1}s (--connect-timeout-ms): {last_error}")]
    CoordinatorUnreachable { addr: String, attempts: u32, waited_s: f64, last_error: String },
    #[error("lost the coordinator at {addr}: {message}")]
    CoordinatorLost { addr: String, message: String },
    #[error("the coordinator at {addr} rejected this worker: {message}")]
    Rejected { addr: String, message: String },
    #[error("the coordinator sent an unusable job config: {0}")]
    JobConfig(String),
    #[error("{0}")]
    Runtime(String),
}

impl WorkerError {
    pub fn retryable(&self) -> bool {
        match self {
            WorkerError::CoordinatorUnreachable { .. }
            | WorkerError::CoordinatorLost { .. }
            | WorkerError::Bind { .. } => true,
            WorkerError::Usage { .. }
            | WorkerError::Device { .. }
            | WorkerError::Rejected { .. }
            | WorkerError::JobConfig(_)
            | WorkerError::Runtime(_) => false,
        }
    }

    pub fn exit_status(&self) -> ExitStatus {
        match self {
            WorkerError::Usage { .. } | WorkerError::Device { .. } => ExitStatus::Usage,
            WorkerError::CoordinatorUnreachable { .. } | WorkerError::CoordinatorLost { .. } => {
                ExitStatus::CoordinatorUnreachable
            }
            WorkerError::Rejected { .. } | WorkerError::JobConfig(_) => ExitStatus::Rendezvous,
            WorkerError::Bind { .. } | WorkerError::Runtime(_) => ExitStatus::TaskFailed,
        }
    }
}
