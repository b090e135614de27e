//! Process exit codes, one per failure class, documented in docs/configuration.md. Scripts and schedulers (SLURM
//! requeue, Kubernetes backoff) depend on them, so a code never changes meaning.

/// How a simclr process ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// The job completed.
    Success,
    /// An unexpected internal error (a bug).
    Internal,
    /// A wrong flag, a bad config file or value.
    Usage,
    /// Rendezvous failed: timed out, or the coordinator rejected the registration.
    Rendezvous,
    /// The coordinator could not be reached (after retries), or stopped answering.
    CoordinatorUnreachable,
    /// The job was aborted: a worker was lost or failed, and the coordinator stopped the job.
    JobAborted,
    /// This process's own work failed (a task error, a server that could not bind).
    TaskFailed,
    /// The dataset cannot be used: unreadable, empty, unusable files under `on_bad_file = "fail"`, or
    /// (for `inspect`) any unusable file.
    DataError,
    /// Stopped by a signal (SIGINT, SIGTERM): 128 + the signal number, as shells report it.
    Interrupted(i32),
}

impl ExitStatus {
    pub fn code(self) -> i32 {
        match self {
            ExitStatus::Success => 0,
            ExitStatus::Internal => 1,
            ExitStatus::Usage => 2,
            ExitStatus::Rendezvous => 3,
            ExitStatus::CoordinatorUnreachable => 4,
            ExitStatus::JobAborted => 5,
            ExitStatus::TaskFailed => 6,
            ExitStatus::DataError => 7,
            ExitStatus::Interrupted(signal) => 128 + signal,
        }
    }

    pub fn from_code(code: i32) -> Option<ExitStatus> {
        Some(match code {
            0 => ExitStatus::Success,
            1 => ExitStatus::Internal,
            2 => ExitStatus::Usage,
            3 => ExitStatus::Rendezvous,
            4 => ExitStatus::CoordinatorUnreachable,
            5 => ExitStatus::JobAborted,
            6 => ExitStatus::TaskFailed,
            7 => ExitStatus::DataError,
            c if c > 128 && c < 128 + 65 => ExitStatus::Interrupted(c - 128),
            _ => return None,
        })
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self {
            ExitStatus::Success => "success".to_string(),
            ExitStatus::Internal => "internal error".to_string(),
            ExitStatus::Usage => "bad usage or config".to_string(),
            ExitStatus::Rendezvous => "rendezvous failed".to_string(),
            ExitStatus::CoordinatorUnreachable => "coordinator unreachable".to_string(),
            ExitStatus::JobAborted => "job aborted".to_string(),
            ExitStatus::TaskFailed => "task failed".to_string(),
            ExitStatus::DataError => "unusable dataset".to_string(),
            ExitStatus::Interrupted(signal) => format!("interrupted by signal {signal}"),
        };
        write!(f, "{what} (exit {})", self.code())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_distinct() {
        let all = [
            ExitStatus::Success,
            ExitStatus::Internal,
            ExitStatus::Usage,
            ExitStatus::Rendezvous,
            ExitStatus::CoordinatorUnreachable,
            ExitStatus::JobAborted,
            ExitStatus::TaskFailed,
            ExitStatus::DataError,
            ExitStatus::Interrupted(2),
            ExitStatus::Interrupted(15),
        ];
        let mut codes: Vec<i32> = all.iter().map(|s| s.code()).collect();
        for s in all {
            assert_eq!(ExitStatus::from_code(s.code()), Some(s));
        }
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
        assert_eq!(ExitStatus::Interrupted(15).code(), 143);
    }
}
