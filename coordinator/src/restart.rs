//! The restart policy: after an attempt ends, whether the job goes on (a retryable failure with restarts
//! left, `cluster.max_restarts`) and with how many workers (`--elastic`: the ones not lost, down to a
//! number that divides the global batch); and [`run_attempts`], the loop both `dev` and `run` use, which
//! runs attempts until one is final. How an attempt's workers come and go is the caller's: `dev` spawns
//! them, under SLURM and Kubernetes their launcher restarts them.

use std::sync::Arc;

use simclr_common::JobConfig;

use crate::events::{JobOutcome, Member, MemberStatus};
use crate::{Coordinator, CoordinatorError, Job};

/// What follows an attempt.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The outcome is final: it succeeded, failed permanently, or no restart is left.
    Stop,
    /// Start the next attempt from the last checkpoint; `world_size`: a smaller group (elastic).
    Restart { world_size: Option<u32> },
}

/// The decision after attempt number `attempt` (0 for the first) of a job with `config` ended with
/// `outcome`, its members as they were at the end.
pub fn decide(outcome: &JobOutcome, attempt: u32, config: &JobConfig, members: &[Member], elastic: bool) -> Decision {
    if !outcome.retryable || attempt >= config.cluster.max_restarts {
        return Decision::Stop;
    }
    let world_size = if elastic { elastic_world_size(members, config) } else { None };
    Decision::Restart { world_size }
}

/// The group of an elastic restart: the workers not lost, down to a number that divides the global
/// batch when pretraining runs; `None` when that is the whole group (or nobody is left).
pub fn elastic_world_size(members: &[Member], config: &JobConfig) -> Option<u32> {
    let world = members.len() as u32;
    let alive = members.iter().filter(|m| !matches!(m.status, MemberStatus::Lost { .. })).count() as u32;
    let batch = config.pretrain.batch_size as u32;
    let fits = |n: u32| !config.pretrain.enabled || batch.is_multiple_of(n);
    let n = (1..=alive).rev().find(|&n| fits(n))?;
    (n < world).then_some(n)
}

/// Runs attempts of the coordinator's job until one is final: `attempt` runs one (it is handed the
/// coordinator and the attempt's job, and returns how it ended); after a retryable failure with
/// restarts left the coordinator starts the next attempt (smaller, with `elastic`) and `attempt` runs
/// again. Returns the final outcome.
pub async fn run_attempts(
    coordinator: &mut Coordinator,
    elastic: bool,
    mut attempt: impl AsyncFnMut(&mut Coordinator, Arc<Job>) -> Result<JobOutcome, CoordinatorError>,
) -> Result<JobOutcome, CoordinatorError> {
    loop {
        let job = coordinator.job();
        let outcome = attempt(coordinator, Arc::clone(&job)).await?;
        match decide(&outcome, job.attempt, &job.config, &job.members(), elastic) {
            Decision::Stop => return Ok(outcome),
            Decision::Restart { world_size } => {
                tracing::warn!(message = %outcome.message, "attempt failed; the next one resumes from the last checkpoint");
                if let Some(n) = world_size {
                    let was = job.config.cluster.world_size;
                    tracing::warn!(workers = n, was, "continuing with {n} of {was} workers (--elastic)");
                }
                coordinator.restart(world_size)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use simclr_common::{ExitStatus, StopReason, WorkerIdentity};

    use super::*;

    fn outcome(retryable: bool) -> JobOutcome {
        JobOutcome {
            status: ExitStatus::JobAborted,
            message: "a worker was lost".into(),
            results_table: None,
            retryable,
        }
    }

    fn members(lost: &[usize], world: usize) -> Vec<Member> {
        (0..world)
            .map(|rank| Member {
                identity: WorkerIdentity {
                    instance_id: format!("w{rank}"),
                    host: "h".into(),
                    peer_addr: format!("h:{}", 9000 + rank),
                    device: "cpu".into(),
                    pid: rank as u32,
                    version: simclr_common::VERSION.into(),
                },
                status: if lost.contains(&rank) {
                    MemberStatus::Lost { reason: "killed".into() }
                } else {
                    MemberStatus::Left { success: false, reason: "stopped".into() }
                },
                last_heartbeat: Instant::now(),
                phase: "pretrain".into(),
                step: 0,
                total: 0,
            })
            .collect()
    }

    fn config(max_restarts: u32, batch_size: usize) -> JobConfig {
        let mut config = JobConfig::default();
        config.cluster.max_restarts = max_restarts;
        config.pretrain.batch_size = batch_size as _;
        config
    }

    #[test]
    fn only_a_retryable_failure_with_restarts_left_restarts() {
        let c = config(2, 64);
        let all = members(&[], 4);
        assert_eq!(decide(&outcome(true), 0, &c, &all, false), Decision::Restart { world_size: None });
        assert_eq!(decide(&outcome(true), 1, &c, &all, false), Decision::Restart { world_size: None });
        assert_eq!(decide(&outcome(true), 2, &c, &all, false), Decision::Stop, "the restarts are spent");
        assert_eq!(decide(&outcome(false), 0, &c, &all, false), Decision::Stop, "a permanent failure");
        assert_eq!(decide(&outcome(true), 0, &config(0, 64), &all, false), Decision::Stop, "max_restarts = 0");
    }

    #[test]
    fn an_elastic_restart_keeps_the_largest_group_that_divides_the_batch() {
        // 4 workers, one lost: 3 do not divide 64, so 2 go on.
        assert_eq!(
            decide(&outcome(true), 0, &config(3, 64), &members(&[1], 4), true),
            Decision::Restart { world_size: Some(2) }
        );
        // 3 divide 96.
        assert_eq!(elastic_world_size(&members(&[0], 4), &config(3, 96)), Some(3));
        // Nobody lost: the whole group, no resize.
        assert_eq!(elastic_world_size(&members(&[], 4), &config(3, 64)), None);
        // Everybody lost: nothing to go on with (the restart then waits for the whole group).
        assert_eq!(elastic_world_size(&members(&[0, 1], 2), &config(3, 64)), None);
        // Without pretraining any number of workers will do.
        let mut probe_only = config(3, 64);
        probe_only.pretrain.enabled = false;
        assert_eq!(elastic_world_size(&members(&[2], 4), &probe_only), Some(3));
        // Not elastic: the same group again.
        assert_eq!(
            decide(&outcome(true), 0, &config(3, 64), &members(&[1], 4), false),
            Decision::Restart { world_size: None }
        );
    }

    /// The loop with a real coordinator (no workers): every attempt fails retryably, so it runs
    /// `max_restarts + 1` attempts, each a new job with the next attempt number in the same run
    /// directory, and returns the last outcome.
    #[tokio::test]
    async fn attempts_run_until_the_restarts_are_spent() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = config(2, 64);
        c.job.id = "restart-test".into();
        c.job.run_dir = Some(dir.path().to_path_buf());
        c.cluster.world_size = 1;
        c.validate().unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut coordinator = Coordinator::start(c, listener, None, None).unwrap();
        let mut seen = Vec::new();
        let outcome = run_attempts(&mut coordinator, false, async |coordinator, job| {
            seen.push(job.attempt);
            assert_eq!(job.run_dir().path(), dir.path());
            job.abort(StopReason::Aborted, format!("attempt {}", job.attempt), ExitStatus::JobAborted);
            let mut outcome = coordinator.outcome().await;
            outcome.retryable = true;
            Ok(outcome)
        })
        .await
        .unwrap();
        coordinator.close().await;
        assert_eq!(seen, [0, 1, 2]);
        assert!(outcome.message.starts_with("attempt 2"), "{}", outcome.message);
        assert!(outcome.retryable, "the last attempt's outcome is returned as it was");
    }
}
