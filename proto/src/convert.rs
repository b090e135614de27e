//! Wire type <-> domain type conversions. Missing required fields become `tonic::Status` errors that
//! name the field, so a malformed message never panics a handler.

use simclr_common::{PeerTable, StopNotice, StopReason, WorkerIdentity};

use crate::wire;

impl From<WorkerIdentity> for wire::WorkerInfo {
    fn from(w: WorkerIdentity) -> Self {
        wire::WorkerInfo {
            instance_id: w.instance_id,
            host: w.host,
            peer_addr: w.peer_addr,
            device: w.device,
            pid: w.pid,
            version: w.version,
        }
    }
}

impl From<wire::WorkerInfo> for WorkerIdentity {
    fn from(w: wire::WorkerInfo) -> Self {
        WorkerIdentity {
            instance_id: w.instance_id,
            host: w.host,
            peer_addr: w.peer_addr,
            device: w.device,
            pid: w.pid,
            version: w.version,
        }
    }
}

/// The peer table as wire entries, one per rank.
pub fn peer_table_to_wire(table: &PeerTable) -> Vec<wire::PeerEntry> {
    table
        .workers
        .iter()
        .enumerate()
        .map(|(rank, w)| wire::PeerEntry { rank: rank as u32, worker: Some(w.clone().into()) })
        .collect()
}

/// The peer table from wire entries; requires ranks 0..n, each exactly once.
pub fn peer_table_from_wire(mut entries: Vec<wire::PeerEntry>) -> Result<PeerTable, tonic::Status> {
    {
        entries.sort_by_key(|e| e.rank);
        let mut workers = Vec::with_capacity(entries.len());
        for (expected, entry) in entries.into_iter().enumerate() {
            if entry.rank as usize != expected {
                return Err(tonic::Status::invalid_argument(format!(
                    "peer table: expected rank {expected}, found rank {}",
                    entry.rank
                )));
            }
            let worker = entry
                .worker
                .ok_or_else(|| tonic::Status::invalid_argument(format!("peer table: rank {expected} has no worker")))?;
            workers.push(worker.into());
        }
        Ok(PeerTable { workers })
    }
}

impl From<StopNotice> for wire::StopNotice {
    fn from(n: StopNotice) -> Self {
        let reason = match n.reason {
            StopReason::Completed => wire::StopReason::Completed,
            StopReason::Aborted => wire::StopReason::Aborted,
            StopReason::Cancelled => wire::StopReason::Cancelled,
        };
        wire::StopNotice { reason: reason as i32, message: n.message }
    }
}

impl From<wire::StopNotice> for StopNotice {
    /// An unknown or unspecified reason is treated as an abort: stopping is always safe, completing
    /// successfully on a misread notice is not.
    fn from(n: wire::StopNotice) -> Self {
        let reason = match wire::StopReason::try_from(n.reason) {
            Ok(wire::StopReason::Completed) => StopReason::Completed,
            Ok(wire::StopReason::Cancelled) => StopReason::Cancelled,
            Ok(wire::StopReason::Aborted) | Ok(wire::StopReason::Unspecified) | Err(_) => StopReason::Aborted,
        };
        StopNotice { reason, message: n.message }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(i: u32) -> WorkerIdentity {
        WorkerIdentity {
            instance_id: format!("w{i}"),
            host: "h".into(),
            peer_addr: format!("127.0.0.1:{}", 1000 + i),
            device: "cpu".into(),
            pid: i,
            version: "0".into(),
        }
    }

    #[test]
    fn peer_table_round_trips_and_rejects_gaps() {
        let table = PeerTable { workers: vec![worker(0), worker(1), worker(2)] };
        let mut wire_entries = peer_table_to_wire(&table);
        wire_entries.reverse();
        assert_eq!(peer_table_from_wire(wire_entries.clone()).unwrap(), table);
        wire_entries.remove(1);
        let err = peer_table_from_wire(wire_entries).unwrap_err();
        assert!(err.message().contains("expected rank 1"), "{}", err.message());
    }

    #[test]
    fn unknown_stop_reason_reads_as_abort() {
        let n = wire::StopNotice { reason: 99, message: "x".into() };
        assert_eq!(StopNotice::from(n).reason, StopReason::Aborted);
        let done = StopNotice { reason: StopReason::Completed, message: "ok".into() };
        assert_eq!(StopNotice::from(wire::StopNotice::from(done.clone())), done);
    }
}
