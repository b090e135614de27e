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

/// All-reduces of at most this many bytes (by default; [`set_small_all_reduce_bytes`]) run as an
/// all-gather and a sum in rank order on every rank: W - 1 ring steps instead of the ring
/// all-reduce's 2 (W - 1), for (W - 1) n bytes on each link instead of 2 (W - 1) n / W. Latency rules
/// small messages (synchronised BatchNorm's per-layer sums, the loss), bandwidth large ones (the
/// gradients). On loopback TCP they cross near 16 KiB with both 4 and 16 ranks
/// (`bench_small_all_reduce`, BENCHMARKS.md); the gathered bytes per link grow with the world, so the
/// crossing moves down as it grows.
pub const SMALL_ALL_REDUCE_BYTES: usize = 16 * 1024;

static SMALL_ALL_REDUCE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(SMALL_ALL_REDUCE_BYTES);

/// Sets the size up to which all-reduces gather and sum (process-wide; every rank must use the same,
/// or their collectives would not pair up). For benchmarks: 0 for the ring always.
pub fn set_small_all_reduce_bytes(bytes: usize) {
    SMALL_ALL_REDUCE.store(bytes, std::sync::atomic::Ordering::Relaxed);
}

/// The sum of the `w` rows of `rows` (each `n` long) in rank order, into `out`: the same float
/// additions on every rank, whatever its thread count, so the replicas stay bitwise identical.
fn sum_rows_in_order(rows: &[f32], n: usize, out: &mut [f32]) {
    out.copy_from_slice(&rows[..n]);
    for row in rows[n..].chunks_exact(n) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += *v;
        }
    }
}

/// What every backend does around its plans: the copies in and out, the shapes, the checks.
pub(crate) trait RingExecutor {
    fn ring_rank(&self) -> usize;
    fn ring_world(&self) -> usize;
    /// Runs `plan` on `data` (a contiguous float32 CPU buffer).
    fn execute(&self, name: &'static str, plan: &[RingStep], data: &mut Buffer) -> Result<(), CollectiveError>;

    fn ring_all_reduce(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let mut data = Buffer::copy_of(t, "all-reduce")?;
        self.all_reduce_buffer(&mut data)?;
        Ok(data.into_tensor(&t.size(), t.device()))
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
        let mut rows = Buffer::zeros(n * w);
        rows.slice_mut(r * n, (r + 1) * n).copy_from_slice(&data.slice(0)[..n]);
        self.execute("all-reduce", &all_gather_plan(r, w, n), &mut rows)?;
        sum_rows_in_order(rows.slice(0), n, data.slice_mut(0, n));
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
