//! Collectives between the workers of a job: all-gather, all-reduce (sum), reduce-scatter (sum),
//! broadcast and barrier, each bounded by a timeout, so a dead or stalled peer becomes an error on every
//! other rank instead of a hang.
//!
//! [`Solo`] is the world of one. [`GrpcCollective`] is the CPU backend: peer to peer over the workers'
//! own gRPC endpoints (never through the coordinator), ring algorithms (each rank sends to rank + 1 and
//! receives from rank - 1, so every link carries 2 (W - 1) / W of the data once), messages streamed in
//! bounded chunks into a mailbox keyed by (sender, collective number, ring step).
//!
//! Every rank issues the same collectives in the same order, so a per-rank counter names each one
//! consistently across ranks. Results are bitwise identical on every rank: each element of an
//! all-reduce is summed once, by one rank, in a fixed order, and then copied to the others, which keeps
//! the replicas' weights identical step after step.
//!
//! The calls block the calling thread (a training thread, never an async task) on the worker's tokio
//! runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use simclr_proto::client::{data_channel, worker_client, AttachToken, WorkerClient};
use simclr_proto::wire;
use tch::{Kind, Tensor};
use tokio::sync::oneshot;
use tonic::codegen::Bytes;
use tonic::Status;

#[derive(Debug, Clone, thiserror::Error)]
pub enum CollectiveError {
    #[error("{op}: no message from rank {peer} ({addr}) within {timeout_ms} ms (cluster.collective_timeout_ms)")]
    Timeout { op: &'static str, peer: usize, addr: String, timeout_ms: u64 },
    #[error("{op}: sending to rank {peer} ({addr}) failed: {message}")]
    Send { op: &'static str, peer: usize, addr: String, message: String },
    #[error("{op}: the connection with rank {peer} ({addr}) failed: {message}")]
    Link { op: &'static str, peer: usize, addr: String, message: String },
    #[error("{op}: {message}")]
    Invalid { op: &'static str, message: String },
    /// A set-up that cannot work as configured, whatever is retried (NCCL's invalid usage, say).
    #[error("{op}: {message}")]
    Unusable { op: &'static str, message: String },
}

impl CollectiveError {
    /// Whether a restart cannot cure it.
    pub fn is_permanent(&self) -> bool {
        matches!(self, CollectiveError::Unusable { .. })
    }
}

/// The operations the training and probe loops need. Tensors are float32; results come back on the
/// input's device.
pub trait Collective: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum over ranks, the same on every rank.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError>;
    /// The same sum written over `t`. Backends work in the tensor's own memory where they can (a
    /// contiguous float32 tensor on their device), which saves allocating and copying a buffer of its
    /// size: for gradients, tens of megabytes per step.
    fn all_reduce_sum_in_place(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let sum = self.all_reduce_sum(t)?;
        t.copy_(&sum);
        Ok(())
    }
    /// Every rank's tensor (all of one shape) concatenated along dimension 0 in rank order.
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError>;
    /// `t`'s dimension 0 holds world-size equal blocks; returns block `rank` summed over ranks.
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError>;
    /// Rank `root`'s tensor on every rank (`t` gives the shape elsewhere).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CollectiveError>;
    fn barrier(&self) -> Result<(), CollectiveError>;
}

/// The world of one: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        Ok(t.detach().copy())
    }
    fn all_reduce_sum_in_place(&self, _t: &mut Tensor) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        Ok(t.detach().copy())
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        Ok(t.detach().copy())
    }
    fn broadcast(&self, t: &Tensor, _root: usize) -> Result<Tensor, CollectiveError> {
        Ok(t.detach().copy())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
}

/// A collective that adds up the time spent in its calls (the communication share of a step).
pub struct Timed {
    inner: Arc<dyn Collective>,
    nanos: AtomicU64,
}

impl Timed {
    pub fn new(inner: Arc<dyn Collective>) -> Timed {
        Timed { inner, nanos: AtomicU64::new(0) }
    }

    /// Seconds spent in collectives so far.
    pub fn seconds(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    fn time<T>(&self, f: impl FnOnce(&dyn Collective) -> T) -> T {
        let started = std::time::Instant::now();
        let out = f(&*self.inner);
        self.nanos.fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

impl Collective for Timed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        self.time(|c| c.all_reduce_sum(t))
    }
    fn all_reduce_sum_in_place(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        self.time(|c| c.all_reduce_sum_in_place(t))
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        self.time(|c| c.all_gather(t))
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        self.time(|c| c.reduce_scatter_sum(t))
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CollectiveError> {
        self.time(|c| c.broadcast(t, root))
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.time(|c| c.barrier())
    }
}

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

// ---- the gRPC backend -----------------------------------------------------------------------------

/// Bytes per streamed chunk: well under the gRPC message limit, large enough to keep per-message
/// overhead small.
const CHUNK_BYTES: usize = 1 << 20;

#[cfg(target_endian = "big")]
compile_error!("the gRPC collective sends float32 in memory order and assumes little-endian hosts");

/// The float32 CPU tensor a collective works on in place. Its chunks go out as `Bytes` that borrow the
/// tensor's memory (keeping the tensor alive) instead of copies: a chunk is only written after the
/// transfer that read it has been acknowledged, i.e. fully consumed by the sender.
pub(crate) struct Buffer {
    tensor: Tensor,
    ptr: *mut f32,
    len: usize,
}

/// A read-only view of part of a tensor's memory, owning a reference to the tensor.
struct TensorBytes {
    _tensor: Tensor,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the tensor keeps the memory alive; the bytes are only read, and never written while a
// transfer that reads them is in flight (see `Buffer`).
unsafe impl Send for TensorBytes {}

impl AsRef<[u8]> for TensorBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len lies inside the tensor's contiguous storage, alive as long as `_tensor`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl Buffer {
    /// A contiguous float32 CPU copy of `t` (the collective's result is built in it).
    fn copy_of(t: &Tensor, op: &'static str) -> Result<Buffer, CollectiveError> {
        if t.kind() != Kind::Float {
            return Err(CollectiveError::Invalid { op, message: format!("expected float32, got {:?}", t.kind()) });
        }
        Ok(Buffer::wrap(t.detach().to_device(tch::Device::Cpu).contiguous().copy()))
    }

    fn zeros(len: usize) -> Buffer {
        Buffer::wrap(Tensor::zeros([len as i64], (Kind::Float, tch::Device::Cpu)))
    }

    fn wrap(tensor: Tensor) -> Buffer {
        let len = tensor.numel();
        let ptr = tensor.data_ptr() as *mut f32;
        Buffer { tensor, ptr, len }
    }

    /// Elements a..b as bytes, sharing the memory.
    fn bytes(&self, a: usize, b: usize) -> Bytes {
        assert!(a <= b && b <= self.len);
        Bytes::from_owner(TensorBytes {
            _tensor: self.tensor.shallow_clone(),
            // SAFETY: a <= len, inside the allocation.
            ptr: unsafe { self.ptr.add(a) }.cast::<u8>(),
            len: (b - a) * 4,
        })
    }

    /// Elements from `a` to the end.
    pub(crate) fn slice(&self, a: usize) -> &[f32] {
        assert!(a <= self.len);
        // SAFETY: inside the tensor's contiguous float32 storage.
        unsafe { std::slice::from_raw_parts(self.ptr.add(a), self.len - a) }
    }

    pub(crate) fn slice_mut(&mut self, a: usize, b: usize) -> &mut [f32] {
        assert!(a <= b && b <= self.len);
        // SAFETY: inside the tensor's contiguous float32 storage, which this buffer owns; no transfer
        // reads this range while it is written (see the type's comment).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(a), b - a) }
    }

    fn into_tensor(self, shape: &[i64], device: tch::Device) -> Tensor {
        self.tensor.view(shape).to_device(device)
    }
}

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

// ---- ring algorithms, as plans that every point-to-point backend executes -------------------------

/// One step of a ring algorithm on a flat float32 buffer: send elements `send` to the right neighbour
/// while receiving elements `recv` from the left one, added (`add`) or copied into place. The two
/// ranges of a step never overlap.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RingStep {
    pub send: Option<std::ops::Range<usize>>,
    pub recv: Option<std::ops::Range<usize>>,
    pub add: bool,
}

/// Chunk `c` of `n` elements split into `w` nearly equal parts.
fn chunk(c: usize, n: usize, w: usize) -> std::ops::Range<usize> {
    c * n / w..(c + 1) * n / w
}

/// Ring all-reduce in place: a reduce-scatter (after W - 1 steps rank r holds the full sum of chunk
/// r + 1) then an all-gather of the summed chunks. Every link carries 2 (W - 1) / W of the buffer.
pub(crate) fn all_reduce_plan(rank: usize, w: usize, n: usize) -> Vec<RingStep> {
    let mut plan = Vec::with_capacity(2 * (w - 1));
    for s in 0..w - 1 {
        let send = chunk((rank + w - s) % w, n, w);
        let recv = chunk((rank + 2 * w - s - 1) % w, n, w);
        plan.push(RingStep { send: Some(send), recv: Some(recv), add: true });
    }
    for s in 0..w - 1 {
        let send = chunk((rank + 1 + w - s) % w, n, w);
        let recv = chunk((rank + w - s) % w, n, w);
        plan.push(RingStep { send: Some(send), recv: Some(recv), add: false });
    }
    plan
}

/// Ring reduce-scatter of W equal blocks: afterwards block `rank` holds its sum over ranks.
pub(crate) fn reduce_scatter_plan(rank: usize, w: usize, block: usize) -> Vec<RingStep> {
    (0..w - 1)
        .map(|s| {
            let send = (rank + 2 * w - s - 1) % w;
            let recv = (rank + 2 * w - s - 2) % w;
            RingStep {
                send: Some(send * block..(send + 1) * block),
                recv: Some(recv * block..(recv + 1) * block),
                add: true,
            }
        })
        .collect()
}

/// Ring all-gather of equal blocks into rank order; the buffer holds this rank's block already.
pub(crate) fn all_gather_plan(rank: usize, w: usize, block: usize) -> Vec<RingStep> {
    (0..w - 1)
        .map(|s| {
            let send = (rank + w - s) % w;
            let recv = (rank + 2 * w - s - 1) % w;
            RingStep {
                send: Some(send * block..(send + 1) * block),
                recv: Some(recv * block..(recv + 1) * block),
                add: false,
            }
        })
        .collect()
}

/// Broadcast along the ring from `root`: each rank receives from its left, then forwards to its right
/// unless the right is the root.
pub(crate) fn broadcast_plan(rank: usize, w: usize, root: usize, n: usize) -> Vec<RingStep> {
    let mut plan = Vec::new();
    if rank != root {
        plan.push(RingStep { send: None, recv: Some(0..n), add: false });
    }
    if (rank + 1) % w != root {
        plan.push(RingStep { send: Some(0..n), recv: None, add: false });
    }
    plan
}

/// What every backend does around its plans: the copies in and out, the shapes, the checks.
pub(crate) trait RingExecutor {
    fn ring_rank(&self) -> usize;
    fn ring_world(&self) -> usize;
    /// Runs `plan` on `data` (a contiguous float32 CPU buffer).
    fn execute(&self, name: &'static str, plan: &[RingStep], data: &mut Buffer) -> Result<(), CollectiveError>;

    fn ring_all_reduce(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let mut data = Buffer::copy_of(t, "all-reduce")?;
        let (r, w) = (self.ring_rank(), self.ring_world());
        if w > 1 {
            self.execute("all-reduce", &all_reduce_plan(r, w, data.len), &mut data)?;
        }
        Ok(data.into_tensor(&t.size(), t.device()))
    }

    fn ring_all_reduce_in_place(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let (r, w) = (self.ring_rank(), self.ring_world());
        if t.device() != tch::Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() {
            let sum = self.ring_all_reduce(t)?;
            t.copy_(&sum);
            return Ok(());
        }
        let mut data = Buffer::wrap(t.shallow_clone());
        if w > 1 {
            self.execute("all-reduce", &all_reduce_plan(r, w, data.len), &mut data)?;
        }
        Ok(())
    }

    fn ring_all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let local = Buffer::copy_of(t, "all-gather")?;
        let (r, w) = (self.ring_rank(), self.ring_world());
        let mut shape = t.size();
        if shape.is_empty() {
            shape = vec![w as i64];
        } else {
            shape[0] *= w as i64;
        }
        if w == 1 {
            return Ok(local.into_tensor(&shape, t.device()));
        }
        let block = local.len;
        let mut out = Buffer::zeros(block * w);
        // SAFETY: `local` is a contiguous float32 buffer of `block` elements.
        let own = unsafe { std::slice::from_raw_parts(local.ptr, block) };
        out.slice_mut(r * block, (r + 1) * block).copy_from_slice(own);
        self.execute("all-gather", &all_gather_plan(r, w, block), &mut out)?;
        Ok(out.into_tensor(&shape, t.device()))
    }

    fn ring_reduce_scatter(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let (r, w) = (self.ring_rank(), self.ring_world());
        let mut shape = t.size();
        if shape.is_empty() || shape[0] % w as i64 != 0 {
            return Err(CollectiveError::Invalid {
                op: "reduce-scatter",
                message: format!("shape {shape:?}: dimension 0 must be a multiple of the world size {w}"),
            });
        }
        let mut data = Buffer::copy_of(t, "reduce-scatter")?;
        let block = data.len / w;
        if w > 1 {
            self.execute("reduce-scatter", &reduce_scatter_plan(r, w, block), &mut data)?;
        }
        shape[0] /= w as i64;
        let own = data.tensor.view([-1]).narrow(0, (r * block) as i64, block as i64).copy().view(shape.as_slice());
        Ok(own.to_device(t.device()))
    }

    fn ring_broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CollectiveError> {
        let (r, w) = (self.ring_rank(), self.ring_world());
        if root >= w {
            return Err(CollectiveError::Invalid {
                op: "broadcast",
                message: format!("root {root} outside a world of {w}"),
            });
        }
        let mut data = Buffer::copy_of(t, "broadcast")?;
        if w > 1 {
            self.execute("broadcast", &broadcast_plan(r, w, root, data.len), &mut data)?;
        }
        Ok(data.into_tensor(&t.size(), t.device()))
    }
}

/// Implements [`Collective`] for a [`RingExecutor`].
macro_rules! ring_collective {
    ($t:ty) => {
        impl $crate::collective::Collective for $t {
            fn rank(&self) -> usize {
                $crate::collective::RingExecutor::ring_rank(self)
            }
            fn world_size(&self) -> usize {
                $crate::collective::RingExecutor::ring_world(self)
            }
            fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
                self.ring_all_reduce(t)
            }
            fn all_reduce_sum_in_place(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
                self.ring_all_reduce_in_place(t)
            }
            fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
                self.ring_all_gather(t)
            }
            fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
                self.ring_reduce_scatter(t)
            }
            fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CollectiveError> {
                self.ring_broadcast(t, root)
            }
            fn barrier(&self) -> Result<(), CollectiveError> {
                self.ring_all_reduce(&Tensor::from_slice(&[1f32])).map(|_| ())
            }
        }
    };
}
pub(crate) use ring_collective;

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

/// A group of gRPC collectives on loopback in this process, each with its own peer server: the
/// collectives' tests and the world-size invariance tests use it.
#[doc(hidden)]
pub mod loopback {
    use super::*;
    use tokio_util::sync::CancellationToken;

    pub struct Group {
        pub members: Vec<Arc<dyn Collective>>,
        shutdown: CancellationToken,
        // Dropped last: the servers run on it.
        _runtime: Option<tokio::runtime::Runtime>,
    }

    impl Drop for Group {
        fn drop(&mut self) {
            self.shutdown.cancel();
        }
    }

    /// `world` gRPC ranks, each with its own peer server on 127.0.0.1, all alive until the group is
    /// dropped.
    pub fn group(world: usize, timeout: Duration) -> Group {
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        let shutdown = CancellationToken::new();
        let mut addrs = Vec::new();
        let mut mailboxes = Vec::new();
        for _ in 0..world {
            let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
            addrs.push(listener.local_addr().unwrap().to_string());
            let mailbox = Arc::new(Mailbox::default());
            mailboxes.push(Arc::clone(&mailbox));
            let control = crate::peer::Control::new();
            runtime.spawn(crate::peer::serve(listener, control, mailbox, None, shutdown.clone()));
        }
        let members = {
            let _context = runtime.enter();
            mailboxes
                .into_iter()
                .enumerate()
                .map(|(rank, mailbox)| {
                    let c = GrpcCollective::new(
                        rank,
                        &addrs,
                        mailbox,
                        AttachToken::default(),
                        timeout,
                        runtime.handle().clone(),
                    );
                    Arc::new(c.unwrap()) as Arc<dyn Collective>
                })
                .collect()
        };
        Group { members, shutdown, _runtime: Some(runtime) }
    }

    /// `world` TCP-ring ranks on 127.0.0.1.
    pub fn tcp_group(world: usize, timeout: Duration) -> Group {
        let listeners: Vec<_> = (0..world).map(|_| crate::tcp::listen("127.0.0.1".parse().unwrap()).unwrap()).collect();
        let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let members = std::thread::scope(|s| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let addrs = &addrs;
                    s.spawn(move || crate::tcp::TcpRing::connect(rank, listener, addrs, Some("t0ken"), timeout))
                })
                .collect();
            handles.into_iter().map(|h| Arc::new(h.join().unwrap().unwrap()) as Arc<dyn Collective>).collect()
        });
        Group { members, shutdown: CancellationToken::new(), _runtime: None }
    }

    /// Runs `f(rank, collective)` on one thread per rank and returns the results in rank order.
    pub fn run<T: Send>(group: &Group, f: impl Fn(usize, &dyn Collective) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = group
                .members
                .iter()
                .enumerate()
                .map(|(r, c)| {
                    s.spawn({
                        let f = &f;
                        move || f(r, &**c)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::to_f64;

    fn rank_data(rank: usize, n: usize) -> Vec<f32> {
        (0..n).map(|i| (rank * 1000 + i) as f32 * 0.5 - 3.0).collect()
    }

    /// Both point-to-point backends: gRPC and the TCP ring.
    type MakeGroup = fn(usize, Duration) -> loopback::Group;
    const BACKENDS: [(&str, MakeGroup); 2] = [("grpc", loopback::group), ("tcp", loopback::tcp_group)];

    #[test]
    fn ring_collectives_match_their_definitions() {
        for (world, (backend, make)) in [2usize, 3, 4].into_iter().flat_map(|w| BACKENDS.map(|b| (w, b))) {
            let group = make(world, Duration::from_secs(20));
            let n = 10; // not a multiple of 3 or 4: uneven chunks
            let results = loopback::run(&group, |rank, c| {
                let t = Tensor::from_slice(&rank_data(rank, n));
                let sum = to_f64(&c.all_reduce_sum(&t).unwrap());
                let gathered = c.all_gather(&t.view([1, n as i64])).unwrap();
                assert_eq!(gathered.size(), [world as i64, n as i64]);
                let blocks = Tensor::from_slice(&rank_data(rank, 2 * world)).view([world as i64, 2]);
                let scattered = to_f64(&c.reduce_scatter_sum(&blocks).unwrap());
                let root = world - 1;
                let b = to_f64(&c.broadcast(&Tensor::from_slice(&rank_data(rank, 5)), root).unwrap());
                c.barrier().unwrap();
                (sum, to_f64(&gathered), scattered, b)
            });
            for (rank, (sum, gathered, scattered, b)) in results.into_iter().enumerate() {
                let want: Vec<f64> = (0..n).map(|i| (0..world).map(|r| f64::from(rank_data(r, n)[i])).sum()).collect();
                assert_eq!(sum, want, "{backend} all-reduce, world {world}, rank {rank}");
                let want: Vec<f64> = (0..world).flat_map(|r| rank_data(r, n)).map(f64::from).collect();
                assert_eq!(gathered, want, "{backend} all-gather, world {world}");
                let want: Vec<f64> = (0..2)
                    .map(|j| (0..world).map(|r| f64::from(rank_data(r, 2 * world)[rank * 2 + j])).sum())
                    .collect();
                assert_eq!(scattered, want, "{backend} reduce-scatter, world {world}, rank {rank}");
                let want: Vec<f64> = rank_data(world - 1, 5).into_iter().map(f64::from).collect();
                assert_eq!(b, want, "{backend} broadcast, world {world}, rank {rank}");
            }
        }
    }

    #[test]
    fn large_messages_stream_in_chunks() {
        for (backend, make) in BACKENDS {
            let group = make(2, Duration::from_secs(30));
            let n = 3 * CHUNK_BYTES / 4 * 3 + 7; // several chunks per ring step
            let results = loopback::run(&group, |rank, c| {
                let t = Tensor::from_slice(&rank_data(rank, n));
                Vec::<f32>::try_from(&c.all_reduce_sum(&t).unwrap()).unwrap()
            });
            let (a, b) = (rank_data(0, n), rank_data(1, n));
            let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
            assert_eq!(results[0], want, "{backend}");
            assert_eq!(results[1], want, "{backend}");
        }
    }

    #[test]
    fn a_silent_peer_is_an_error_naming_it_within_the_timeout() {
        for (backend, make) in BACKENDS {
            let group = make(3, Duration::from_millis(500));
            let started = std::time::Instant::now();
            // Rank 2 never calls: ranks 0 and 1 must fail, not hang.
            let results = loopback::run(&group, |rank, c| {
                if rank == 2 {
                    return None;
                }
                Some(c.all_reduce_sum(&Tensor::from_slice(&[1f32, 2.0, 3.0])).map(|_| ()))
            });
            assert!(started.elapsed() < Duration::from_secs(5), "{backend} took {:?}", started.elapsed());
            let err = results[0].clone().unwrap().unwrap_err().to_string();
            assert!(err.contains("rank 2") && err.contains("cluster.collective_timeout_ms"), "{backend}: {err}");
            assert!(results[1].clone().unwrap().is_err(), "{backend}");
            if backend == "tcp" {
                // The ring is broken for good: the next call fails at once, saying why.
                let again = group.members[0].barrier().unwrap_err().to_string();
                assert!(again.contains("earlier collective"), "{again}");
            }
        }
    }

    #[test]
    fn mismatched_shapes_are_an_error() {
        for (backend, make) in BACKENDS {
            let group = make(2, Duration::from_secs(5));
            let results = loopback::run(&group, |rank, c| {
                c.all_reduce_sum(&Tensor::from_slice(&rank_data(rank, 4 + rank))).map(|_| ()).map_err(|e| e.to_string())
            });
            assert!(results.iter().any(|r| r.as_ref().is_err_and(|e| e.contains("bytes"))), "{backend}: {results:?}");
        }
    }

    /// A peer process that dies mid-job: its neighbours fail at once, naming it, well before the
    /// timeout (a closed connection is not a silence).
    #[test]
    fn a_peer_that_goes_away_is_named_at_once() {
        let group = loopback::tcp_group(2, Duration::from_secs(30));
        let mut members = group.members.clone();
        let survivor = members.remove(0);
        drop(members);
        drop(group);
        let started = std::time::Instant::now();
        let err = survivor.all_reduce_sum(&Tensor::from_slice(&[1f32; 1000])).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
        assert!(err.contains("rank 1"), "{err}");
    }
}
