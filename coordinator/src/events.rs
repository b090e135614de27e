//! What a job tells the rest of the coordinator (the run directory, metrics, progress, TensorBoard):
//! its members, its events as they happen, and its outcome. Plain types, free of the job's state.

use std::collections::BTreeMap;
use std::time::Instant;

use simclr_common::probe::ProbeOutcome;
use simclr_common::{ExitStatus, PeerTable, StopNotice, WorkerIdentity};

#[derive(Debug, Clone, PartialEq)]
pub enum MemberStatus {
    Active,
    Lost { reason: String },
    Left { success: bool, reason: String },
}

#[derive(Debug, Clone)]
pub struct Member {
    pub identity: WorkerIdentity,
    pub status: MemberStatus,
    pub last_heartbeat: Instant,
    pub phase: String,
    pub step: u64,
    pub total: u64,
}

/// What observers (the dev launcher, tests, logs) can follow as it happens.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    Registered {
        worker: String,
    },
    RendezvousComplete {
        table: PeerTable,
    },
    PhaseComplete {
        phase: String,
    },
    Lost {
        rank: u32,
        reason: String,
    },
    Left {
        rank: u32,
        success: bool,
        reason: String,
    },
    Stopping {
        notice: StopNotice,
    },
    /// Rank 0's progress within a phase (the step it has reached, of `total`; 0 when unknown).
    Progress {
        phase: String,
        step: u64,
        total: u64,
        metrics: BTreeMap<String, f64>,
    },
    /// A probe task's result, accepted (the first for its task).
    ProbeResult(Box<ProbeOutcome>),
}

/// How the job ended: the exit status of the coordinator and a one-line reason, and the probe sweep's
/// results table (Markdown) when the sweep reported anything.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOutcome {
    pub status: ExitStatus,
    pub message: String,
    pub results_table: Option<String>,
    /// Whether a restart from the last checkpoint may cure the failure (a worker lost or killed, a
    /// collective cut off), as opposed to a permanent one (bad configuration, bad data, a cancel).
    pub retryable: bool,
}
