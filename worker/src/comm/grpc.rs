//! The gRPC backend of the collectives: ring steps travel over the workers' own peer endpoints, streamed
//! in bounded chunks into the receiver's [`Mailbox`], keyed by (sender, collective number, ring step).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simclr_proto::client::{data_channel, worker_client, AttachToken, WorkerClient};
use simclr_proto::wire;
use tch::Tensor;
use tokio::sync::oneshot;
use tonic::codegen::Bytes;
use tonic::Status;

use super::ring::{ring_collective, Buffer, RingExecutor, RingStep};
use super::CollectiveError;

// ---- the mailbox: what peers sent, waiting for the collective that expects it ----------------------

type Key = (u32, u64, u32);

/// One received message: its chunks as they arrived (slices of the receive buffers, not copied again).
type Message = Vec<Bytes>;

enum Slot {
    /// The collective asked first and waits.
    Waiting(oneshot::Sender<Message>),
    /// The message came first.
    Arrived(Message),
}

/// Messages from peers, delivered by the peer server's `Transfer` handler.
pub struct Mailbox {
    slots: Mutex<HashMap<Key, Slot>>,
    /// Largest message accepted (the gRPC limits bound each chunk, this bounds the whole).
    pub max_message_bytes: u64,
}

impl Default for Mailbox {
    fn default() -> Self {
        Mailbox { slots: Mutex::new(HashMap::new()), max_message_bytes: 4 << 30 }
    }
}

impl Mailbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn deliver(&self, key: Key, message: Message) -> Result<(), Status> {
        let mut slots = self.lock();
        match slots.remove(&key) {
            Some(Slot::Waiting(tx)) => {
                // A collective that gave up (timed out) has dropped its receiver: nothing to do.
                let _ = tx.send(message);
                Ok(())
            }
            Some(arrived @ Slot::Arrived(_)) => {
                slots.insert(key, arrived);
                Err(Status::already_exists(format!(
                    "duplicate transfer from rank {} for collective {} step {}",
                    key.0, key.1, key.2
                )))
            }
            None => {
                slots.insert(key, Slot::Arrived(message));
                Ok(())
            }
        }
    }

    fn expect(&self, key: Key) -> Result<Message, oneshot::Receiver<Message>> {
        let mut slots = self.lock();
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
    /// `total_bytes`.
    pub async fn receive(&self, mut stream: tonic::Streaming<wire::TransferChunk>) -> Result<(), Status> {
        let Some(first) = stream.message().await? else {
            return Err(Status::invalid_argument("empty transfer"));
        };
        let key = (first.from_rank, first.op, first.step);
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
            if (c.from_rank, c.op, c.step) != key || c.total_bytes != total {
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
        self.deliver(key, chunks)
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
    /// (address, client) of every rank; this rank's own entry is never dialled.
    peers: Vec<(String, WorkerClient)>,
    mailbox: Arc<Mailbox>,
    next_op: AtomicU64,
    timeout: Duration,
    runtime: tokio::runtime::Handle,
}

impl GrpcCollective {
    /// `peer_addrs` are every rank's peer endpoints in rank order; `mailbox` is the one this worker's
    /// peer server delivers into. Connections are made on first use.
    pub fn new(
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
        Ok(GrpcCollective { rank, peers, mailbox, next_op: AtomicU64::new(0), timeout, runtime })
    }

    fn world(&self) -> usize {
        self.peers.len()
    }

    fn right(&self) -> usize {
        (self.rank + 1) % self.world()
    }

    fn left(&self) -> usize {
        (self.rank + self.world() - 1) % self.world()
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
        let rx = match self.mailbox.expect((from as u32, op, step)) {
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

    /// One ring step: send `data` to the right neighbour while receiving from the left one.
    async fn ring_step(&self, name: &'static str, op: u64, step: u32, data: Bytes) -> Result<Message, CollectiveError> {
        let (sent, received) =
            tokio::join!(self.send(name, self.right(), op, step, data), self.recv(name, self.left(), op, step));
        sent?;
        received
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

    fn execute(&self, name: &'static str, plan: &[RingStep], data: &mut Buffer) -> Result<(), CollectiveError> {
        let op = self.op();
        // Messages are numbered per link: the n-th message this rank sends to its right is the n-th
        // its right neighbour receives from its left.
        let (mut sent, mut received) = (0u32, 0u32);
        self.block(async {
            for step in plan {
                let got = match (&step.send, &step.recv) {
                    (Some(send), Some(_)) => {
                        debug_assert_eq!(sent, received);
                        Some(self.ring_step(name, op, sent, data.bytes(send.start, send.end)).await?)
                    }
                    (None, Some(_)) => Some(self.recv(name, self.left(), op, received).await?),
                    (Some(send), None) => {
                        self.send(name, self.right(), op, sent, data.bytes(send.start, send.end)).await?;
                        None
                    }
                    (None, None) => None,
                };
                sent += u32::from(step.send.is_some());
                received += u32::from(step.recv.is_some());
                if let (Some(got), Some(recv)) = (got, &step.recv) {
                    absorb(data.slice_mut(recv.start, recv.end), &got, step.add, name)?;
                }
            }
            Ok(())
        })
    }
}

ring_collective!(GrpcCollective);
