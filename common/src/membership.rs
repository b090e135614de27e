//! Domain types of cluster membership: who a worker is, the peer table handed out at rendezvous, and
//! the stop notices the coordinator sends.

use std::fmt;

/// A worker process as it introduces itself at registration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerIdentity {
    /// Unique per process: host, pid and a random part.
    pub instance_id: String,
    pub host: String,
    /// Address ("host:port") of the worker's peer server, as other workers dial it.
    pub peer_addr: String,
    /// "cpu" or "cuda:K".
    pub device: String,
    pub pid: u32,
    pub version: String,
}

impl WorkerIdentity {
    /// Key that orders workers when the coordinator assigns ranks itself: workers on one host get
    /// neighbouring ranks, in device order, then by address. Depends only on who joined, never on
    /// the order of arrival.
    pub fn rank_order_key(&self) -> (String, u32, String, String) {
        let device_index = self.device.strip_prefix("cuda:").and_then(|k| k.parse::<u32>().ok()).unwrap_or(u32::MAX);
        (self.host.clone(), device_index, self.peer_addr.clone(), self.instance_id.clone())
    }
}

impl fmt::Display for WorkerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (pid {} on {}, peer {}, {})", self.instance_id, self.pid, self.host, self.peer_addr, self.device)
    }
}

/// Every rank's identity, indexed by rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTable {
    pub workers: Vec<WorkerIdentity>,
}

impl PeerTable {
    pub fn world_size(&self) -> u32 {
        self.workers.len() as u32
    }

    pub fn get(&self, rank: u32) -> Option<&WorkerIdentity> {
        self.workers.get(rank as usize)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The job finished.
    Completed,
    /// A worker was lost or failed.
    Aborted,
    /// An operator interrupted the job.
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopNotice {
    pub reason: StopReason,
    pub message: String,
}

impl fmt::Display for StopNotice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = match self.reason {
            StopReason::Completed => "completed",
            StopReason::Aborted => "aborted",
            StopReason::Cancelled => "cancelled",
        };
        write!(f, "{reason}: {}", self.message)
    }
}
