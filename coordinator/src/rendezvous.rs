//! Rendezvous as a pure state machine: registrations come in, ranks go out once the expected number of
//! workers has arrived. Owns the admission rules (duplicates, late arrivals, world-size, job and version
//! mismatches) and the rank assignment; knows nothing of gRPC, clocks or tasks.
//!
//! Rank assignment is deterministic: ranks a launcher requested (SLURM_PROCID, dev mode) are kept; the
//! others fill the free ranks in the order of `WorkerIdentity::rank_order_key` (host, device, address),
//! so the result depends only on who joined, never on who arrived first.

use simclr_common::{PeerTable, WorkerIdentity};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RendezvousError {
    #[error("worker {worker} is already registered")]
    DuplicateInstance { worker: String },
    #[error("peer address {addr} of worker {worker} is already registered by {holder}")]
    DuplicatePeerAddr { addr: String, worker: String, holder: String },
    #[error("rank {rank} requested by {worker} is already held by {holder}")]
    DuplicateRank { rank: u32, worker: String, holder: String },
    #[error("rank {rank} requested by {worker} is out of range for world size {world_size}")]
    RankOutOfRange { rank: u32, worker: String, world_size: u32 },
    #[error("worker {worker} expects world size {expected}, but job {job_id} has world size {world_size} (cluster.world_size)")]
    WorldSizeMismatch { worker: String, expected: u32, world_size: u32, job_id: String },
    #[error("worker {worker} expects job '{expected}', but this coordinator runs job '{job_id}'")]
    JobMismatch { worker: String, expected: String, job_id: String },
    #[error("worker {worker} runs version {worker_version}, the coordinator runs {coordinator_version}")]
    VersionMismatch { worker: String, worker_version: String, coordinator_version: String },
    #[error("late registration of {worker} rejected: job {job_id} already has its {world_size} workers")]
    Late { worker: String, job_id: String, world_size: u32 },
}

impl RendezvousError {
    /// None of these resolve by retrying the same registration.
    pub fn retryable(&self) -> bool {
        match self {
            RendezvousError::DuplicateInstance { .. }
            | RendezvousError::DuplicatePeerAddr { .. }
            | RendezvousError::DuplicateRank { .. }
            | RendezvousError::RankOutOfRange { .. }
            | RendezvousError::WorldSizeMismatch { .. }
            | RendezvousError::JobMismatch { .. }
            | RendezvousError::VersionMismatch { .. }
            | RendezvousError::Late { .. } => false,
        }
    }
}

/// One worker's registration, as the rendezvous sees it.
#[derive(Debug, Clone)]
pub struct Registration {
    pub worker: WorkerIdentity,
    pub requested_rank: Option<u32>,
    pub expected_world_size: Option<u32>,
    pub expected_job_id: String,
}

#[derive(Debug)]
pub struct Rendezvous {
    job_id: String,
    world_size: u32,
    version: String,
    pending: Vec<Registration>,
    table: Option<PeerTable>,
}

impl Rendezvous {
    pub fn new(job_id: impl Into<String>, world_size: u32, version: impl Into<String>) -> Self {
        Rendezvous { job_id: job_id.into(), world_size, version: version.into(), pending: Vec::new(), table: None }
    }

    /// Admits a registration. Returns the peer table when this one completed the rendezvous.
    pub fn register(&mut self, reg: Registration) -> Result<Option<PeerTable>, RendezvousError> {
        let who = reg.worker.to_string();
        if self.table.is_some() {
            return Err(RendezvousError::Late {
                worker: who,
                job_id: self.job_id.clone(),
                world_size: self.world_size,
            });
        }
        if reg.worker.version != self.version {
            return Err(RendezvousError::VersionMismatch {
                worker: who,
                worker_version: reg.worker.version.clone(),
                coordinator_version: self.version.clone(),
            });
        }
        if !reg.expected_job_id.is_empty() && reg.expected_job_id != self.job_id {
            return Err(RendezvousError::JobMismatch {
                worker: who,
                expected: reg.expected_job_id.clone(),
                job_id: self.job_id.clone(),
            });
        }
        if let Some(expected) = reg.expected_world_size.filter(|&w| w != self.world_size) {
            return Err(RendezvousError::WorldSizeMismatch {
                worker: who,
                expected,
                world_size: self.world_size,
                job_id: self.job_id.clone(),
            });
        }
        if let Some(rank) = reg.requested_rank {
            if rank >= self.world_size {
                return Err(RendezvousError::RankOutOfRange { rank, worker: who, world_size: self.world_size });
            }
        }
        for other in &self.pending {
            if other.worker.instance_id == reg.worker.instance_id {
                return Err(RendezvousError::DuplicateInstance { worker: who });
            }
            if other.worker.peer_addr == reg.worker.peer_addr {
                return Err(RendezvousError::DuplicatePeerAddr {
                    addr: reg.worker.peer_addr.clone(),
                    worker: who,
                    holder: other.worker.to_string(),
                });
            }
            if reg.requested_rank.is_some() && other.requested_rank == reg.requested_rank {
                return Err(RendezvousError::DuplicateRank {
                    rank: reg.requested_rank.unwrap_or_default(),
                    worker: who,
                    holder: other.worker.to_string(),
                });
            }
        }
        self.pending.push(reg);
        if self.pending.len() as u32 == self.world_size {
            let table = self.assign_ranks();
            self.table = Some(table.clone());
            return Ok(Some(table));
        }
        Ok(None)
    }

    /// Withdraws a registration whose worker went away before the rendezvous completed (its call was
    /// cancelled). Returns whether it was pending.
    pub fn withdraw(&mut self, instance_id: &str) -> bool {
        if self.table.is_some() {
            return false;
        }
        let before = self.pending.len();
        self.pending.retain(|r| r.worker.instance_id != instance_id);
        self.pending.len() != before
    }

    pub fn table(&self) -> Option<&PeerTable> {
        self.table.as_ref()
    }

    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// The workers registered so far (for a timeout message that says who is missing).
    pub fn pending(&self) -> &[Registration] {
        &self.pending
    }

    fn assign_ranks(&self) -> PeerTable {
        let n = self.world_size as usize;
        let mut slots: Vec<Option<WorkerIdentity>> = vec![None; n];
        let mut unranked: Vec<&Registration> = Vec::new();
        for reg in &self.pending {
            match reg.requested_rank {
                Some(rank) => slots[rank as usize] = Some(reg.worker.clone()),
                None => unranked.push(reg),
            }
        }
        unranked.sort_by_key(|r| r.worker.rank_order_key());
        let mut unranked = unranked.into_iter();
        let workers = slots
            .into_iter()
            .map(|slot| match slot {
                Some(w) => w,
                // Admission guarantees exactly n registrations and distinct requested ranks, so
                // the free slots and the unranked workers are equally many.
                None => unranked.next().map(|r| r.worker.clone()).expect("one unranked worker per free rank"),
            })
            .collect();
        PeerTable { workers }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(i: u32, host: &str, rank: Option<u32>) -> Registration {
        Registration {
            worker: WorkerIdentity {
                instance_id: format!("{host}-w{i}"),
                host: host.to_string(),
                peer_addr: format!("{host}:{}", 5000 + i),
                device: "cpu".into(),
                pid: 100 + i,
                version: "v".into(),
            },
            requested_rank: rank,
            expected_world_size: None,
            expected_job_id: String::new(),
        }
    }

    fn ranks_of(table: &PeerTable) -> Vec<String> {
        table.workers.iter().map(|w| w.instance_id.clone()).collect()
    }

    #[test]
    fn assignment_does_not_depend_on_arrival_order() {
        let regs = [reg(2, "b", None), reg(0, "a", None), reg(1, "b", None), reg(3, "a", None)];
        let mut orders = vec![];
        for rotation in 0..regs.len() {
            let mut rv = Rendezvous::new("j", 4, "v");
            let mut table = None;
            for k in 0..regs.len() {
                table = rv.register(regs[(k + rotation) % regs.len()].clone()).unwrap();
            }
            orders.push(ranks_of(&table.unwrap()));
        }
        assert!(orders.windows(2).all(|w| w[0] == w[1]), "{orders:?}");
        // Same host, neighbouring ranks, by address.
        assert_eq!(orders[0], vec!["a-w0", "a-w3", "b-w1", "b-w2"]);
    }

    #[test]
    fn requested_ranks_are_kept_and_the_rest_fill_the_gaps() {
        let mut rv = Rendezvous::new("j", 3, "v");
        assert!(rv.register(reg(0, "a", None)).unwrap().is_none());
        assert!(rv.register(reg(1, "a", Some(0))).unwrap().is_none());
        let table = rv.register(reg(2, "a", Some(2))).unwrap().unwrap();
        assert_eq!(ranks_of(&table), vec!["a-w1", "a-w0", "a-w2"]);
    }

    #[test]
    fn admission_rules_reject_with_names() {
        let mut rv = Rendezvous::new("job-7", 3, "v");
        rv.register(reg(0, "a", Some(1))).unwrap();
        let e = rv.register(reg(0, "a", None)).unwrap_err();
        assert!(matches!(e, RendezvousError::DuplicateInstance { .. }), "{e}");
        let mut same_addr = reg(9, "a", None);
        same_addr.worker.peer_addr = "a:5000".into();
        assert!(matches!(rv.register(same_addr).unwrap_err(), RendezvousError::DuplicatePeerAddr { .. }));
        let e = rv.register(reg(1, "a", Some(1))).unwrap_err();
        assert!(e.to_string().contains("rank 1") && e.to_string().contains("a-w0"), "{e}");
        assert!(matches!(rv.register(reg(1, "a", Some(3))).unwrap_err(), RendezvousError::RankOutOfRange { .. }));
        let mut wrong_ws = reg(1, "a", None);
        wrong_ws.expected_world_size = Some(4);
        let e = rv.register(wrong_ws).unwrap_err();
        assert!(e.to_string().contains("world size 4") && e.to_string().contains("world size 3"), "{e}");
        let mut wrong_job = reg(1, "a", None);
        wrong_job.expected_job_id = "other".into();
        assert!(matches!(rv.register(wrong_job).unwrap_err(), RendezvousError::JobMismatch { .. }));
        let mut old = reg(1, "a", None);
        old.worker.version = "old".into();
        assert!(matches!(rv.register(old).unwrap_err(), RendezvousError::VersionMismatch { .. }));
        rv.register(reg(1, "a", None)).unwrap();
        assert!(rv.register(reg(2, "a", None)).unwrap().is_some());
        let e = rv.register(reg(3, "a", None)).unwrap_err();
        assert!(matches!(e, RendezvousError::Late { world_size: 3, .. }), "{e}");
        assert!(!e.retryable());
    }

    #[test]
    fn a_withdrawn_registration_frees_its_place() {
        let mut rv = Rendezvous::new("j", 2, "v");
        rv.register(reg(0, "a", Some(0))).unwrap();
        assert!(rv.withdraw("a-w0"));
        assert!(rv.register(reg(1, "a", Some(0))).unwrap().is_none());
        assert_eq!(rv.pending().len(), 1);
    }
}
