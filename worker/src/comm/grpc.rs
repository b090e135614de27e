//! The gRPC backend of the collectives: ring steps travel over the workers' own peer endpoints, streamed
//! in bounded chunks into the receiver's [`Mailbox`], keyed by (sender, collective number, ring step).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simclr_proto::client::{data_channel, worker_client, AttachToken, WorkerClient};
use simclr_proto::wire;
use tch::Tensor;
use tokio::sync::oneshot;
use tonic::codegen::Bytes;
use tonic::Status;

use super::ring::{ring_collective, Buffer, RingExecutor, Step};
use super::CollectiveError;

// ---- the mailbox: what peers sent, waiting for the collective that expects it ----------------------

/// (phase, sender, collective number, ring step). Collective numbers restart with every phase's
/// collective, so the phase is part of the key.
type Key = (String, u32, u64, u32);

/// One received message: its chunks as they arrived (slices of the receive buffers, not copied again).
type Message = Vec<Bytes>;

enum Slot {
    /// The collective asked first and waits.
    Waiting(oneshot::Sender<Message>),
    /// The message came first.
    Arrived(Message),
}

#[derive(Default)]
struct Boxes {
    slots: HashMap<Key, Slot>,
    /// The job attempt this worker joined (`None` until it has, and in tests without a job).
    attempt: Option<u32>,
    /// The phase whose collective this worker runs now, and the ones it has left.
    current: Option<String>,
    left: HashSet<String>,
}

/// Messages from peers, delivered by the peer server's `Transfer` handler. A message of a phase this
/// worker has left, or of another attempt of the job, is dropped (and its sender told so): its
/// collective number would otherwise name a collective of the phase running now. A message of a phase
/// not yet entered is kept: a faster peer may start the next phase's collective first.
/// The phase a channel name belongs to: `pretrain` for `pretrain` and `pretrain/gradients`.
fn phase_of(channel: &str) -> &str {
    channel.split('/').next().unwrap_or(channel)
}

pub struct Mailbox {
    boxes: Mutex<Boxes>,
    /// Largest message accepted (the gRPC limits bound each chunk, this bounds the whole).
    pub max_message_bytes: u64,
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox { boxes: Mutex::new(Boxes::default()), max_message_bytes: 4 << 30 }
    }
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Boxes> {
        self.boxes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the job attempt this worker joined; messages of other attempts are dropped from now on.
    pub fn join_attempt(&self, attempt: u32) {
        self.lock().attempt = Some(attempt);
    }

    fn attempt(&self) -> u32 {
        self.lock().attempt.unwrap_or(0)
    }

    /// Starts `phase`'s collectives: the phase before it is left, and whatever of it is still here
    /// (late messages nobody will read) is dropped. `phase/channel` is a second channel of `phase`
    /// (its own collective numbers), entered beside it.
    fn enter_phase(&self, phase: &str) {
        let phase = phase_of(phase);
        let mut boxes = self.lock();
        if boxes.current.as_deref() == Some(phase) {
            return;
        }
        if let Some(previous) = boxes.current.replace(phase.to_string()) {
            boxes.left.insert(previous);
        }
        let Boxes { slots, left, .. } = &mut *boxes;
        let before = slots.len();
        slots.retain(|key, _| !left.contains(phase_of(&key.0)));
        if slots.len() < before {
            tracing::warn!(phase, dropped = before - slots.len(), "dropped messages of a phase this worker has left");
        }
    }

    /// Why a message of `phase` and `attempt` from `from` is not for this worker now, if it is not.
    fn stale(&self, phase: &str, attempt: u32, from: u32) -> Option<String> {
        let boxes = self.lock();
        match boxes.attempt {
            Some(mine) if mine != attempt => {
                Some(format!("a message of attempt {attempt} from rank {from}; this worker is in attempt {mine}"))
            }
            _ if boxes.left.contains(phase_of(phase)) => {
                Some(format!("a message of phase '{phase}' from rank {from}, a phase this worker has left"))
            }
            _ => None,
        }
    }

    fn deliver(&self, key: Key, message: Message) -> Result<(), Status> {
        let mut boxes = self.lock();
        let slots = &mut boxes.slots;
        match slots.remove(&key) {
            Some(Slot::Waiting(tx)) => {
                // A collective that gave up (timed out) has dropped its receiver: nothing to do.
                let _ = tx.send(message);
                Ok(())
            }
            Some(arrived @ Slot::Arrived(_)) => {
                let (phase, from, op, step) = (&key.0, key.1, key.2, key.3);
                let status = Status::already_exists(format!(
                    "duplicate transfer from rank {from} for collective {op} step {step} of phase '{phase}'"
                ));
                slots.insert(key, arrived);
                Err(status)
            }
            None => {
                slots.insert(key, Slot::Arrived(message));
                Ok(())
            }
        }
    }

    fn expect(&self, key: Key) -> Result<Message, oneshot::Receiver<Message>> {
        let slots = &mut self.lock().slots;
        match slots.remove(&key) {
            Some(Slot::Arrived(message)) => Ok(message),
            _ => {
                let (tx, rx) = oneshot::channel();
                slots.insert(key, Slot::Waiting(tx));
                Err(rx)
            }
        }
    }

    /// Reads one streamed transfer and files it. Chunks must agree on the header and add up to exactly
    /// `total_bytes`; a stale one (see the type) is refused at its first chunk.
    pub async fn receive(&self, mut stream: tonic::Streaming<wire::TransferChunk>) -> Result<(), Status> {
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("empty transfer"));
        };
        if let Some(why) = self.stale(&first.phase, first.attempt, first.from_rank) {
            tracing::warn!("dropped {why}");
            return Err(Status::failed_precondition(format!("dropped: {why}")));
        }
        let header = (first.phase.clone(), first.attempt, first.from_rank, first.op, first.step);
        if first.total_bytes > self.max_message_bytes {
            return Err(Status::resource_exhausted(format!(
                "transfer of {} bytes exceeds the limit of {} bytes",
                first.total_bytes, self.max_message_bytes
            )));
        }
        let total = first.total_bytes;
        let mut received = 0u64;
        let mut chunks = Vec::with_capacity((total as usize).div_ceil(CHUNK_BYTES).max(1));
        let mut chunk = Some(first);
        while let Some(c) = chunk {
            if (c.phase.as_str(), c.attempt, c.from_rank, c.op, c.step)
                != (header.0.as_str(), header.1, header.2, header.3, header.4)
                || c.total_bytes != total
            {
                return Err(Status::invalid_argument("transfer chunks disagree on their header"));
            }
            received += c.data.len() as u64;
            if received > total {
                return Err(Status::invalid_argument(format!("transfer longer than its declared {total} bytes")));
            }
            chunks.push(c.data);
            chunk = stream.message().await?;
        }
        if received != total {
            return Err(Status::invalid_argument(format!(
                "transfer ended after {received} of its declared {total} bytes"
            )));
        }
        let (phase, _, from, op, step) = header;
        self.deliver((phase, from, op, step), chunks)
    }
}

/// Bytes per streamed chunk: well under the gRPC message limit, large enough to keep per-message
/// overhead small.
pub(super) const CHUNK_BYTES: usize = 1 << 20;

/// Folds a received message into `dst` element by element (`add`: sum, else copy).
fn absorb(dst: &mut [f32], message: &Message, add: bool, op: &'static str) -> Result<(), CollectiveError> {
    let total: usize = message.iter().map(Bytes::len).sum();
    if total != dst.len() * 4 || message.iter().any(|c| c.len() % 4 != 0) {
        return Err(CollectiveError::Invalid {
            op,
            message: format!(
                "a peer sent {total} bytes where {} were expected (mismatched tensor shapes?)",
                dst.len() * 4
            ),
        });
    }
    let mut at = 0;
    for chunk in message {
        let n = chunk.len() / 4;
        let out = &mut dst[at..at + n];
        if add {
            for (d, s) in out.iter_mut().zip(chunk.chunks_exact(4)) {
                *d += f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        } else {
            for (d, s) in out.iter_mut().zip(chunk.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
        at += n;
    }
    Ok(())
}

pub struct GrpcCollective {
    rank: usize,
    /// The job phase and attempt its messages carry (see [`Mailbox`]).
    phase: String,
    attempt: u32,
    /// (address, client) of every rank; this rank's own entry is never dialled.
    peers: Vec<(String, WorkerClient)>,
    mailbox: Arc<Mailbox>,
    next_op: AtomicU64,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
}

impl GrpcCollective {
    /// The collectives of `phase`: `peer_addrs` are every rank's peer endpoints in rank order;
    /// `mailbox` is the one this worker's peer server delivers into, which from now on drops messages of
    /// the phase before. Connections are made on first use.
    pub fn new(
        phase: &str,
        rank: usize,
        peer_addrs: &[String],
        mailbox: Arc<Mailbox>,
        token: AttachToken,
        timeout: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Result<GrpcCollective, CollectiveError> {
        if rank >= peer_addrs.len() {
            return Err(CollectiveError::Invalid {
                op: "setup",
                message: format!("rank {rank} outside a world of {}", peer_addrs.len()),
            });
        }
        let peers = peer_addrs
            .iter()
            .map(|addr| {
                let channel = data_channel(addr, timeout).map_err(|e| CollectiveError::Invalid {
                    op: "setup",
                    message: format!("peer address {addr}: {}", e.message()),
                })?;
                Ok((addr.clone(), worker_client(channel, token.clone())))
            })
            .collect::<Result<Vec<_>, CollectiveError>>()?;
        mailbox.enter_phase(phase);
        let attempt = mailbox.attempt();
        Ok(GrpcCollective {
            rank,
            phase: phase.to_string(),
            attempt,
            peers,
            mailbox,
            next_op: AtomicU64::new(0),
            timeout,
            runtime,
        })
    }

    fn world(&self) -> usize {
        self.peers.len()
    }

    async fn send(
        &self,
        op_name: &'static str,
        to: usize,
        op: u64,
        step: u32,
        data: Bytes,
    ) -> Result<(), CollectiveError> {
        let (addr, client) = &self.peers[to];
        let total = data.len();
        let from_rank = self.rank as u32;
        let chunks: Vec<wire::TransferChunk> = (0..total.div_ceil(CHUNK_BYTES).max(1))
            .map(|i| wire::TransferChunk {
                phase: self.phase.clone(),
                attempt: self.attempt,
                from_rank,
                op,
                step,
                total_bytes: total as u64,
                data: data.slice(i * CHUNK_BYTES..((i + 1) * CHUNK_BYTES).min(total)),
            })
            .collect();
        let mut client = client.clone();
        let fail = |message: String| CollectiveError::Send { op: op_name, peer: to, addr: addr.clone(), message };
        match tokio::time::timeout(self.timeout, client.transfer(tokio_stream::iter(chunks))).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(status)) => Err(fail(status.message().to_string())),
            Err(_) => Err(fail(format!("no acknowledgement within {} ms", self.timeout.as_millis()))),
        }
    }

    async fn recv(&self, op_name: &'static str, from: usize, op: u64, step: u32) -> Result<Message, CollectiveError> {
        let rx = match self.mailbox.expect((self.phase.clone(), from as u32, op, step)) {
            Ok(message) => return Ok(message),
            Err(rx) => rx,
        };
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(message)) => Ok(message),
            _ => Err(CollectiveError::Timeout {
                op: op_name,
                peer: from,
                addr: self.peers[from].0.clone(),
                timeout_ms: self.timeout.as_millis() as u64,
            }),
        }
    }

    fn op(&self) -> u64 {
        self.next_op.fetch_add(1, Ordering::SeqCst)
    }

    fn block<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(f)
    }
}

impl RingExecutor for GrpcCollective {
    fn ring_rank(&self) -> usize {
        self.rank
    }

    fn ring_world(&self) -> usize {
        self.world()
    }

    fn execute(&self, name: &'static str, plan: &[Step], data: &mut Buffer) -> Result<(), CollectiveError> {
        let op = self.op();
        // Messages are numbered per link: the n-th message this rank sends to a peer is the n-th that
        // peer receives from it.
        let (mut sent, mut received) = (vec![0u32; self.world()], vec![0u32; self.world()]);
        self.block(async {
            for step in plan {
                let send = async {
                    match &step.send {
                        Some((to, range)) => {
                            self.send(name, *to, op, sent[*to], data.bytes(range.start, range.end)).await
                        }
                        None => Ok(()),
                    }
                };
                let recv = async {
                    match &step.recv {
                        Some((from, _)) => self.recv(name, *from, op, received[*from]).await.map(Some),
                        None => Ok(None),
                    }
                };
                let (sent_result, got) = tokio::join!(send, recv);
                sent_result?;
                let got = got?;
                if let Some((to, _)) = &step.send {
                    sent[*to] += 1;
                }
                if let (Some(got), Some((from, range))) = (got, &step.recv) {
                    received[*from] += 1;
                    absorb(data.slice_mut(range.start, range.end), &got, step.add, name)?;
                }
            }
            Ok(())
        })
    }
}

ring_collective!(GrpcCollective);

#[cfg(test)]
mod tests {
    use super::*;

    fn key(phase: &str, op: u64) -> Key {
        (phase.to_string(), 1, op, 0)
    }

    #[test]
    fn messages_of_a_left_phase_or_another_attempt_are_dropped_and_the_next_phase_is_kept() {
        let mailbox = Mailbox::default();
        mailbox.join_attempt(2);
        mailbox.enter_phase("pretrain");
        // A second channel of the same phase is entered beside it.
        mailbox.enter_phase("pretrain/gradients");
        assert_eq!(mailbox.stale("pretrain", 2, 1), None);
        mailbox.deliver(key("pretrain/gradients", 0), vec![Bytes::from_static(b"bucket")]).unwrap();
        // A late message of pretrain's collective 0 and an early one of the probe phase's collective 0.
        mailbox.deliver(key("pretrain", 0), vec![Bytes::from_static(b"late")]).unwrap();
        mailbox.deliver(key("probe", 0), vec![Bytes::from_static(b"early")]).unwrap();
        assert_eq!(mailbox.stale("pretrain", 2, 1), None);
        assert!(mailbox.stale("pretrain", 1, 1).unwrap().contains("attempt 1"), "another attempt is refused");

        mailbox.enter_phase("probe");
        let why = mailbox.stale("pretrain", 2, 1).expect("pretrain is left");
        assert!(why.contains("phase 'pretrain'") && why.contains("rank 1"), "{why}");
        assert!(mailbox.stale("pretrain/gradients", 2, 1).is_some(), "its channels are left with it");
        assert_eq!(mailbox.lock().slots.len(), 1, "pretrain's late messages are gone");
        // The probe phase's collective 0 gets its own message, not pretrain's.
        match mailbox.expect(key("probe", 0)) {
            Ok(got) => assert_eq!(got, vec![Bytes::from_static(b"early")]),
            Err(_) => panic!("the early message should wait for its collective"),
        }
    }
}
