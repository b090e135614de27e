//! What a phase runs with: [`PhaseContext`] (this rank, the job, the coordinator, the collectives of the
//! phase), what it hands back ([`PhaseOutput`]) and why it failed ([`PhaseError`]).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use simclr_common::config::CollectiveBackend;
use simclr_common::{JobConfig, PeerTable};
use simclr_proto::client::{AttachToken, CoordinatorClient};
use simclr_proto::wire;
use tokio_util::sync::CancellationToken;

use crate::comm::nccl::NcclCollective;
use crate::comm::{Collective, GrpcCollective, Mailbox, Solo};

/// What a phase hands to the code that runs it.
pub struct PhaseContext {
    pub rank: u32,
    pub instance_id: String,
    pub table: PeerTable,
    pub config: JobConfig,
    pub token: AttachToken,
    pub coordinator: CoordinatorClient,
    /// Where the peer server files collective messages for this worker.
    pub mailbox: Arc<Mailbox>,
    pub device: tch::Device,
    /// Fires when the worker is told to stop; long computations check it between steps.
    pub interrupt: CancellationToken,
    /// The interface the peer endpoint listens on; the TCP ring listens there too.
    pub peer_listen: IpAddr,
    /// The cluster token, which the TCP ring's connections carry.
    pub cluster_token: Option<String>,
    /// `--data-root`: read images only under this directory.
    pub data_root_limit: Option<std::path::PathBuf>,
    /// `--data-mount FROM=TO`: where this host sees the dataset roots the coordinator names.
    pub data_mount: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl PhaseContext {
    /// Where this rank's images come from (checked against `--data-root`).
    pub(crate) fn assignments(&self) -> crate::phase::assignments::Assignments {
        crate::phase::assignments::Assignments {
            client: self.coordinator.clone(),
            rank: self.rank,
            instance_id: self.instance_id.clone(),
            data_root_limit: self.data_root_limit.clone(),
            data_mount: self.data_mount.clone(),
        }
    }

    /// Reports progress within a phase; failures are logged, never fatal (the heartbeat decides).
    pub async fn report_progress(&self, phase: &str, step: u64, total: u64) {
        let request = wire::ReportProgressRequest {
            rank: self.rank,
            instance_id: self.instance_id.clone(),
            phase: phase.into(),
            step,
            total,
            ..Default::default()
        };
        if let Err(e) = self.coordinator.clone().report_progress(request).await {
            tracing::debug!(error = %e.message(), "progress report failed");
        }
    }
}

impl PhaseContext {
    /// The collectives of `phase` (`cluster.collective`): NCCL when every rank has a GPU of its own (or
    /// when asked for), the TCP ring (or gRPC, under TLS or when asked for) otherwise, nothing at all for
    /// a world of one (unless NCCL is asked for explicitly, which checks that path on one GPU).
    ///
    /// A set-up that can never work as configured (NCCL on a CPU rank or on a GPU another rank uses, the
    /// TCP ring under TLS, NCCL's own invalid-usage answer) is a permanent failure; anything else (a
    /// peer that does not come, a link that breaks) may be cured by a restart.
    /// A second channel between the ranks for the gradient buckets of `phase` (a ring of its own, see
    /// `Trainer::use_gradient_collective`), where the backend allows one: the CPU backends. None with
    /// one rank, and with NCCL (two communicators on one stream may deadlock).
    pub async fn gradient_collective(&self, phase: &str) -> Result<Option<Arc<dyn Collective>>, PhaseError> {
        let placement = self.table.workers.iter().map(|w| (w.host.as_str(), w.device.as_str()));
        if self.table.world_size() < 2 || self.config.cluster.collective.resolve(placement) == CollectiveBackend::Nccl {
            return Ok(None);
        }
        self.collective(&format!("{phase}/gradients")).await.map(Some)
    }

    pub async fn collective(&self, phase: &str) -> Result<Arc<dyn Collective>, PhaseError> {
        let world = self.table.world_size() as usize;
        let timeout = Duration::from_millis(self.config.cluster.collective_timeout_ms);
        let asked = self.config.cluster.collective;
        let placement = || self.table.workers.iter().map(|w| (w.host.as_str(), w.device.as_str()));
        let mut backend = asked.resolve(placement());
        // The TCP ring has no TLS: with TLS (every process of the job has it, or none could have
        // joined), CPU collectives go over the peers' gRPC links, which do.
        if backend == CollectiveBackend::Tcp && self.config.tls.enabled() {
            if asked == CollectiveBackend::Tcp {
                return Err(PhaseError::permanent(
                    "cluster.collective = tcp: the TCP ring has no TLS; with [tls] use grpc or nccl",
                ));
            }
            backend = CollectiveBackend::Grpc;
        }
        if backend == CollectiveBackend::Nccl && self.config.tls.enabled() && self.rank == 0 {
            tracing::warn!("NCCL traffic between the GPUs is not encrypted by [tls]; only the gRPC links are");
        }
        if world > 1 {
            tracing::info!(phase, %backend, tls = self.config.tls.enabled(), "collectives");
        }
        if backend == CollectiveBackend::Nccl && (world > 1 || asked == CollectiveBackend::Nccl) {
            if let Some((rank, (_, device))) = placement().enumerate().find(|(_, (_, d))| !d.starts_with("cuda")) {
                return Err(PhaseError::permanent(format!(
                    "cluster.collective = nccl (--collective) needs every worker on a CUDA device; rank {rank} runs on {device}"
                )));
            }
            let tch::Device::Cuda(ordinal) = self.device else {
                return Err(PhaseError::permanent(format!(
                    "cluster.collective = nccl: this worker's device is {:?}",
                    self.device
                )));
            };
            if let Some((first, second)) = simclr_common::config::shared_gpu(placement()) {
                let w = &self.table.workers[second];
                return Err(PhaseError::permanent(format!(
                    "cluster.collective = nccl (--collective): ranks {first} and {second} both use {} on {}, and NCCL needs a GPU of its own for each rank; give each worker its own GPU (dev --device cuda) or use collective = auto, tcp or grpc",
                    w.device, w.host
                )));
            }
            let rank = self.rank;
            let key = format!("nccl-unique-id/{phase}");
            let handle = tokio::runtime::Handle::current();
            let sharer = self.sharer();
            let share = move |value: Option<Vec<u8>>| handle.block_on(sharer.share(&key, value, timeout));
            let nccl = tokio::task::spawn_blocking(move || {
                NcclCollective::connect(rank as usize, world, ordinal as i64, timeout, share)
            })
            .await
            .map_err(|e| PhaseError::retryable(format!("NCCL set-up thread failed: {e}")))?
            .map_err(PhaseError::from)?;
            return Ok(Arc::new(nccl));
        }
        if world == 1 {
            return Ok(Arc::new(Solo));
        }
        if backend == CollectiveBackend::Tcp {
            return self.tcp_ring(phase, timeout).await.map_err(PhaseError::retryable);
        }
        let addrs: Vec<String> = self.table.workers.iter().map(|w| w.peer_addr.clone()).collect();
        let grpc = GrpcCollective::new(
            phase,
            self.rank as usize,
            &addrs,
            Arc::clone(&self.mailbox),
            self.token.clone(),
            timeout,
            tokio::runtime::Handle::current(),
        )
        .map_err(PhaseError::from)?;
        Ok(Arc::new(grpc))
    }
}

impl PhaseContext {
    /// Joins the TCP ring of `phase`: listens beside the peer endpoint, publishes the address through
    /// the coordinator, learns every rank's, then connects (all within `timeout`).
    async fn tcp_ring(&self, phase: &str, timeout: Duration) -> Result<Arc<dyn Collective>, String> {
        let listener = crate::comm::tcp::listen(self.peer_listen)
            .map_err(|e| format!("TCP ring: cannot listen on {}: {e}", self.peer_listen))?;
        let port = listener.local_addr().map_err(|e| format!("TCP ring listener: {e}"))?.port();
        let me = &self.table.workers[self.rank as usize].peer_addr;
        let host = me.rsplit_once(':').map_or(me.as_str(), |(host, _)| host);
        let mine = format!("{host}:{port}");
        let sharer = self.sharer();
        sharer.share(&format!("tcp-ring/{phase}/{}", self.rank), Some(mine.into_bytes()), timeout).await?;
        let mut addrs = Vec::new();
        for rank in 0..self.table.world_size() {
            let value = sharer.share(&format!("tcp-ring/{phase}/{rank}"), None, timeout).await?;
            addrs.push(String::from_utf8(value).map_err(|_| format!("rank {rank}'s TCP ring address is not text"))?);
        }
        let (rank, token) = (self.rank as usize, self.cluster_token.clone());
        let ring = tokio::task::spawn_blocking(move || {
            crate::comm::tcp::TcpRing::connect(rank, listener, &addrs, token.as_deref(), timeout)
        })
        .await
        .map_err(|e| format!("TCP ring set-up thread failed: {e}"))?
        .map_err(|e| e.to_string())?;
        tracing::debug!(phase, "TCP ring connected");
        Ok(Arc::new(ring))
    }

    fn sharer(&self) -> Sharer {
        Sharer { rank: self.rank, instance_id: self.instance_id.clone(), coordinator: self.coordinator.clone() }
    }
}

/// Publishes and reads values through the coordinator (`ShareValue`), for setting up collectives.
#[derive(Clone)]
struct Sharer {
    rank: u32,
    instance_id: String,
    coordinator: CoordinatorClient,
}

impl Sharer {
    /// Publishes `value` under `key` (Some) or waits for it (None), within `timeout`.
    async fn share(&self, key: &str, value: Option<Vec<u8>>, timeout: Duration) -> Result<Vec<u8>, String> {
        let request =
            wire::ShareValueRequest { rank: self.rank, instance_id: self.instance_id.clone(), key: key.into(), value };
        let mut client = self.coordinator.clone();
        match tokio::time::timeout(timeout, client.share_value(request)).await {
            Ok(Ok(response)) => Ok(response.into_inner().value),
            Ok(Err(status)) => Err(format!("sharing '{key}' through the coordinator: {}", status.message())),
            Err(_) => Err(format!(
                "'{key}' was not published within {} ms (cluster.collective_timeout_ms)",
                timeout.as_millis()
            )),
        }
    }
}

/// What a phase hands back: its metrics for the run directory, and the files it could not use.
#[derive(Debug, Default)]
pub struct PhaseOutput {
    pub metrics: BTreeMap<String, f64>,
    /// (path, reason)
    pub issues: Vec<(String, String)>,
}

/// Whether a restart of the job from its last checkpoint may cure a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// A peer lost, a link cut, the coordinator briefly unreachable: the next attempt may succeed.
    Retryable,
    /// A bad configuration, bad data, a bug: every attempt would fail the same way, so the job stops.
    Permanent,
}

/// Why a phase failed on this rank. The kind is decided where the cause is known (each phase names it
/// as it maps its errors); there is no blanket conversion from a message.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct PhaseError {
    pub kind: ErrorKind,
    pub message: String,
}

impl PhaseError {
    pub fn retryable(message: impl Into<String>) -> PhaseError {
        PhaseError { kind: ErrorKind::Retryable, message: message.into() }
    }

    pub fn permanent(message: impl Into<String>) -> PhaseError {
        PhaseError { kind: ErrorKind::Permanent, message: message.into() }
    }

    pub fn is_retryable(&self) -> bool {
        match self.kind {
            ErrorKind::Retryable => true,
            ErrorKind::Permanent => false,
        }
    }

    /// The same error with `context` before its message.
    pub fn context(self, context: impl std::fmt::Display) -> PhaseError {
        PhaseError { kind: self.kind, message: format!("{context}: {}", self.message) }
    }
}

/// A collective's failure: permanent when it can never work as configured, else (a peer gone, a
/// timeout) retryable.
impl From<crate::comm::CollectiveError> for PhaseError {
    fn from(e: crate::comm::CollectiveError) -> PhaseError {
        if e.is_permanent() {
            PhaseError::permanent(e.to_string())
        } else {
            PhaseError::retryable(e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CollectiveError;

    #[test]
    fn a_collective_failure_is_retryable_unless_it_can_never_work() {
        let (op, addr) = ("all-gather", "h:1".to_string());
        for (e, retryable) in [
            (CollectiveError::Timeout { op, peer: 1, addr: addr.clone(), timeout_ms: 5 }, true),
            (CollectiveError::Send { op, peer: 1, addr: addr.clone(), message: "reset".into() }, true),
            (CollectiveError::Link { op, peer: 1, addr: addr.clone(), message: "closed".into() }, true),
            (CollectiveError::Invalid { op, message: "shapes differ".into() }, false),
            (CollectiveError::Unusable { op: "setup", message: "ncclInvalidUsage".into() }, false),
        ] {
            let message = e.to_string();
            let phase = PhaseError::from(e);
            assert_eq!(phase.is_retryable(), retryable, "{message}");
            assert_eq!(phase.to_string(), message);
        }
        let e = PhaseError::retryable("peer gone").context("probe set-up");
        assert_eq!((e.kind, e.to_string().as_str()), (ErrorKind::Retryable, "probe set-up: peer gone"));
    }
}
