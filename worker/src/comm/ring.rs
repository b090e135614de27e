//! Ring algorithms as plans of point-to-point steps, and what every point-to-point backend (gRPC, the
//! TCP ring) does around them: the float32 buffer a collective works on in place, the copies in and
//! out, the shape checks. A backend only says how one step's send and receive travel.

use tch::{Kind, Tensor};
use tonic::codegen::Bytes;

use super::CollectiveError;

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
    pub(super) fn bytes(&self, a: usize, b: usize) -> Bytes {
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

// ---- algorithms, as plans that every point-to-point backend executes -----------------------------

/// One step of a collective on a flat float32 buffer: send elements `send.1` to rank `send.0` while
/// receiving elements `recv.1` from rank `recv.0`, added (`add`) or copied into place. The two ranges
/// of a step never overlap. The ring algorithms send to the right neighbour and receive from the left
/// one; the latency-bound ones (Bruck's all-gather) reach further.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Step {
    pub send: Option<(usize, std::ops::Range<usize>)>,
    pub recv: Option<(usize, std::ops::Range<usize>)>,
    pub add: bool,
}

/// Chunk `c` of `n` elements split into `w` nearly equal parts.
fn chunk(c: usize, n: usize, w: usize) -> std::ops::Range<usize> {
    c * n / w..(c + 1) * n / w
}

/// A ring step: `send` to the right neighbour, `recv` from the left one.
fn ring_step(
    rank: usize,
    w: usize,
    send: Option<std::ops::Range<usize>>,
    recv: Option<std::ops::Range<usize>>,
    add: bool,
) -> Step {
    Step { send: send.map(|r| ((rank + 1) % w, r)), recv: recv.map(|r| ((rank + w - 1) % w, r)), add }
}

/// Ring all-reduce in place: a reduce-scatter (after W - 1 steps rank r holds the full sum of chunk
/// r + 1) then an all-gather of the summed chunks. Every link carries 2 (W - 1) / W of the buffer.
pub(crate) fn all_reduce_plan(rank: usize, w: usize, n: usize) -> Vec<Step> {
    let mut plan = Vec::with_capacity(2 * (w - 1));
    for s in 0..w - 1 {
        let send = chunk((rank + w - s) % w, n, w);
        let recv = chunk((rank + 2 * w - s - 1) % w, n, w);
        plan.push(ring_step(rank, w, Some(send), Some(recv), true));
    }
    for s in 0..w - 1 {
        let send = chunk((rank + 1 + w - s) % w, n, w);
        let recv = chunk((rank + w - s) % w, n, w);
        plan.push(ring_step(rank, w, Some(send), Some(recv), false));
    }
    plan
}

/// Ring reduce-scatter of W equal blocks: afterwards block `rank` holds its sum over ranks.
pub(crate) fn reduce_scatter_plan(rank: usize, w: usize, block: usize) -> Vec<Step> {
    (0..w - 1)
        .map(|s| {
            let send = (rank + 2 * w - s - 1) % w;
            let recv = (rank + 2 * w - s - 2) % w;
            ring_step(rank, w, Some(send * block..(send + 1) * block), Some(recv * block..(recv + 1) * block), true)
        })
        .collect()
}

/// Ring all-gather of equal blocks into rank order; the buffer holds this rank's block already.
pub(crate) fn all_gather_plan(rank: usize, w: usize, block: usize) -> Vec<Step> {
    (0..w - 1)
        .map(|s| {
            let send = (rank + w - s) % w;
            let recv = (rank + 2 * w - s - 1) % w;
            ring_step(rank, w, Some(send * block..(send + 1) * block), Some(recv * block..(recv + 1) * block), false)
        })
        .collect()
}

/// Bruck's all-gather among the `size` consecutive ranks from `first` (the whole world, or a
/// BatchNorm group): ceil(log2 size) steps instead of the ring's size - 1, each rank sending the same
/// (size - 1) blocks in all. The buffer is in this rank's rotated order: position j holds the block
/// of group member (i - j) mod size, where i is this rank's place in the group, so position 0 is its
/// own block, and step k (d = 2^k) sends positions [0, c) to member i + d and receives positions
/// [d, d + c) from member i - d, c = min(d, size - d): both ranges contiguous.
/// [`bruck_position`] maps a member to its position.
pub(crate) fn bruck_all_gather_plan(rank: usize, first: usize, size: usize, block: usize) -> Vec<Step> {
    let i = rank - first;
    let mut plan = Vec::new();
    let mut d = 1;
    while d < size {
        let c = d.min(size - d);
        plan.push(Step {
            send: Some((first + (i + d) % size, 0..c * block)),
            recv: Some((first + (i + size - d) % size, d * block..(d + c) * block)),
            add: false,
        });
        d *= 2;
    }
    plan
}

/// Where member `member` of the group's block sits in the buffer of [`bruck_all_gather_plan`] on the
/// member at place `i`.
pub(crate) fn bruck_position(i: usize, member: usize, size: usize) -> usize {
    (i + size - member) % size
}

/// Broadcast along the ring from `root`: each rank receives from its left, then forwards to its right
/// unless the right is the root.
pub(crate) fn broadcast_plan(rank: usize, w: usize, root: usize, n: usize) -> Vec<Step> {
    let mut plan = Vec::new();
    if rank != root {
        plan.push(ring_step(rank, w, None, Some(0..n), false));
    }
    if (rank + 1) % w != root {
        plan.push(ring_step(rank, w, Some(0..n), None, false));
    }
    plan
}

/// All-reduces of at most this many bytes (by default; [`set_small_all_reduce_bytes`]) run as Bruck's
/// all-gather and a sum in rank order on every rank: ceil(log2 W) steps instead of the ring
/// all-reduce's 2 (W - 1), for (W - 1) n bytes sent by each rank instead of 2 (W - 1) n / W. Latency
/// rules small messages (synchronised BatchNorm's per-layer sums, the loss), bandwidth large ones (the
/// gradients). Measured with `bench_small_collectives` (BENCHMARKS.md).
pub const SMALL_ALL_REDUCE_BYTES: usize = 16 * 1024;

/// All-gathers whose result is at most this many bytes (by default; [`set_small_all_gather_bytes`])
/// run as Bruck's algorithm (ceil(log2 W) steps), larger ones as the ring (W - 1 steps, each rank
/// talking to its neighbours only). Both send the same bytes; Bruck's reaches log2 W peers and costs a
/// reordering copy of the result. Measured with `bench_small_collectives` (BENCHMARKS.md).
pub const SMALL_ALL_GATHER_BYTES: usize = 1 << 20;

static LATENCY_ALGORITHMS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns Bruck's all-gather off (process-wide, the same on every rank): every all-gather and small
/// all-reduce then runs on the ring, and a group all-gather gathers over the whole world and keeps the
/// group's rows. For before/after benchmarks (`SIMCLR_COLLECTIVE_ALGORITHM=ring` in the worker's
/// environment).
pub fn set_latency_algorithms(enabled: bool) {
    LATENCY_ALGORITHMS.store(enabled, std::sync::atomic::Ordering::Relaxed);
}

fn latency_algorithms() -> bool {
    LATENCY_ALGORITHMS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Whether an all-gather whose result is `bytes` long takes Bruck's algorithm.
fn bruck_for(bytes: usize) -> bool {
    latency_algorithms() && bytes <= SMALL_ALL_GATHER.load(std::sync::atomic::Ordering::Relaxed)
}

static SMALL_ALL_REDUCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(SMALL_ALL_REDUCE_BYTES);
static SMALL_ALL_GATHER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(SMALL_ALL_GATHER_BYTES);

/// Sets the size up to which all-reduces gather and sum (process-wide; every rank must use the same,
/// or their collectives would not pair up). For benchmarks: 0 for the ring always.
pub fn set_small_all_reduce_bytes(bytes: usize) {
    SMALL_ALL_REDUCE.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// Sets the result size up to which all-gathers (and the gathers of small all-reduces) use Bruck's
/// algorithm rather than the ring (process-wide, the same on every rank). For benchmarks: 0 for the
/// ring always.
pub fn set_small_all_gather_bytes(bytes: usize) {
    SMALL_ALL_GATHER.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// The sum over members `0..size` in member order of the rows of `rows` (each `n` long; member `m`'s
/// row at `position(m)`), into `out`: the same float additions on every rank, whatever its thread
/// count or place, so the replicas stay bitwise identical.
fn sum_rows_in_order(rows: &[f32], n: usize, size: usize, position: impl Fn(usize) -> usize, out: &mut [f32]) {
    let row = |m: usize| &rows[position(m) * n..(position(m) + 1) * n];
    out.copy_from_slice(row(0));
    for m in 1..size {
        for (o, v) in out.iter_mut().zip(row(m)) {
            *o += *v;
        }
    }
}

/// The shape of `count` ranks' `t` gathered along dimension 0 (a scalar gathers into a vector).
fn gathered_shape(t: &Tensor, count: usize) -> Vec<i64> {
    let mut shape = t.size();
    match shape.first_mut() {
        Some(rows) => *rows *= count as i64,
        None => shape = vec![count as i64],
    }
    shape
}

/// The blocks of [`bruck_all_gather_plan`]'s buffer on the member at place `i` (rotated order), copied
/// into `out` in member order.
fn in_member_order(rows: &Buffer, i: usize, size: usize, block: usize, out: &mut Buffer) {
    for m in 0..size {
        let at = bruck_position(i, m, size) * block;
        out.slice_mut(m * block, (m + 1) * block).copy_from_slice(&rows.slice(at)[..block]);
    }
}

/// What every point-to-point backend does around its plans: the copies in and out, the shapes, the
/// checks, and which algorithm a call takes.
pub(crate) trait RingExecutor {
    fn ring_rank(&self) -> usize;
    fn ring_world(&self) -> usize;
    /// Runs `plan` on `data` (a contiguous float32 CPU buffer).
    fn execute(&self, name: &'static str, plan: &[Step], data: &mut Buffer) -> Result<(), CollectiveError>;

    fn ring_all_reduce(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let mut data = Buffer::copy_of(t, "all-reduce")?;
        self.all_reduce_buffer(&mut data)?;
        Ok(data.into_tensor(&t.size(), t.device()))
    }

    /// Every block of the `size` ranks from `first` by Bruck's all-gather, in this rank's rotated
    /// order ([`bruck_position`]); `own` is this rank's block.
    fn bruck_gather(
        &self,
        name: &'static str,
        own: &[f32],
        first: usize,
        size: usize,
    ) -> Result<Buffer, CollectiveError> {
        let block = own.len();
        let mut rows = Buffer::zeros(block * size);
        rows.slice_mut(0, block).copy_from_slice(own);
        if size > 1 {
            self.execute(name, &bruck_all_gather_plan(self.ring_rank(), first, size, block), &mut rows)?;
        }
        Ok(rows)
    }

    /// The sum over ranks written over `data`: a gather and an ordered sum for small buffers, the
    /// ring all-reduce for large ones.
    fn all_reduce_buffer(&self, data: &mut Buffer) -> Result<(), CollectiveError> {
        let (r, w, n) = (self.ring_rank(), self.ring_world(), data.len);
        if w < 2 || n == 0 {
            return Ok(());
        }
        if n * 4 > SMALL_ALL_REDUCE.load(std::sync::atomic::Ordering::Relaxed) {
            return self.execute("all-reduce", &all_reduce_plan(r, w, n), data);
        }
        if bruck_for(n * w * 4) {
            let rows = self.bruck_gather("all-reduce", &data.slice(0)[..n], 0, w)?;
            sum_rows_in_order(rows.slice(0), n, w, |m| bruck_position(r, m, w), data.slice_mut(0, n));
        } else {
            let mut rows = Buffer::zeros(n * w);
            rows.slice_mut(r * n, (r + 1) * n).copy_from_slice(&data.slice(0)[..n]);
            self.execute("all-reduce", &all_gather_plan(r, w, n), &mut rows)?;
            sum_rows_in_order(rows.slice(0), n, w, |m| m, data.slice_mut(0, n));
        }
        Ok(())
    }

    fn ring_all_reduce_in_place(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        if t.device() != tch::Device::Cpu || t.kind() != Kind::Float || !t.is_contiguous() {
            let sum = self.ring_all_reduce(t)?;
            t.copy_(&sum);
            return Ok(());
        }
        self.all_reduce_buffer(&mut Buffer::wrap(t.shallow_clone()))
    }

    fn ring_all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let local = Buffer::copy_of(t, "all-gather")?;
        let (r, w) = (self.ring_rank(), self.ring_world());
        let shape = gathered_shape(t, w);
        if w == 1 {
            return Ok(local.into_tensor(&shape, t.device()));
        }
        let block = local.len;
        let own = local.slice(0);
        let mut out = Buffer::zeros(block * w);
        if bruck_for(block * w * 4) {
            let rows = self.bruck_gather("all-gather", own, 0, w)?;
            in_member_order(&rows, r, w, block, &mut out);
        } else {
            out.slice_mut(r * block, (r + 1) * block).copy_from_slice(own);
            self.execute("all-gather", &all_gather_plan(r, w, block), &mut out)?;
        }
        Ok(out.into_tensor(&shape, t.device()))
    }

    /// The all-gather among the `size` consecutive ranks from `first` only (Bruck's algorithm over
    /// the group's own links), rows in member order.
    fn ring_group_all_gather(&self, t: &Tensor, first: usize, size: usize) -> Result<Tensor, CollectiveError> {
        let r = self.ring_rank();
        if size == 0 || first + size > self.ring_world() || !(first..first + size).contains(&r) {
            return Err(CollectiveError::Invalid {
                op: "group all-gather",
                message: format!(
                    "rank {r} is not in the group of {size} ranks from {first} (world {})",
                    self.ring_world()
                ),
            });
        }
        if !latency_algorithms() {
            return Ok(super::group_rows(&self.ring_all_gather(t)?, t, first, size));
        }
        let local = Buffer::copy_of(t, "group all-gather")?;
        let shape = gathered_shape(t, size);
        let block = local.len;
        let rows = self.bruck_gather("group all-gather", local.slice(0), first, size)?;
        let mut out = Buffer::zeros(block * size);
        in_member_order(&rows, r - first, size, block, &mut out);
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
        impl $crate::comm::Collective for $t {
            fn rank(&self) -> usize {
                $crate::comm::RingExecutor::ring_rank(self)
            }
            fn world_size(&self) -> usize {
                $crate::comm::RingExecutor::ring_world(self)
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
            fn group_all_gather(&self, t: &Tensor, first: usize, size: usize) -> Result<Tensor, CollectiveError> {
                self.ring_group_all_gather(t, first, size)
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Bruck's plan run on paper for every group size up to 33 and several places of the group in the
    /// world: each step's peers are in the group and pair up (what one member sends to a peer is what
    /// that peer receives from it, the same ranges), and at the end every position holds the block of
    /// the member [`bruck_position`] names.
    #[test]
    fn bruck_all_gather_plans_deliver_every_block_to_its_position() {
        for size in 1..=33usize {
            for first in [0usize, 3] {
                let plans: Vec<Vec<Step>> =
                    (0..size).map(|i| bruck_all_gather_plan(first + i, first, size, 1)).collect();
                let steps = plans[0].len();
                assert_eq!(steps, (size as f64).log2().ceil() as usize, "size {size}");
                // Position p of member i holds Some(member).
                let mut held: Vec<Vec<Option<usize>>> =
                    (0..size).map(|i| (0..size).map(|p| (p == 0).then_some(i)).collect()).collect();
                for k in 0..steps {
                    let before = held.clone();
                    for (i, plan) in plans.iter().enumerate() {
                        let step = &plan[k];
                        let (from, recv) = step.recv.clone().expect("every step receives");
                        let (to, send) = step.send.clone().expect("every step sends");
                        assert!((first..first + size).contains(&from) && (first..first + size).contains(&to));
                        assert!(send.end <= recv.start || recv.end <= send.start, "size {size}: overlapping ranges");
                        let sender = &plans[from - first][k];
                        assert_eq!(sender.send.clone().map(|(t, r)| (t, r.len())), Some((first + i, recv.len())));
                        for (p, q) in recv.zip(sender.send.clone().unwrap().1) {
                            held[i][p] = before[from - first][q];
                        }
                    }
                }
                for (i, h) in held.iter().enumerate() {
                    for member in 0..size {
                        assert_eq!(h[bruck_position(i, member, size)], Some(member), "size {size}, member {i}");
                    }
                }
            }
        }
    }
}
