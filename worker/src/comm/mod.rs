//! Collectives between the workers of a job: all-gather, all-reduce (sum), reduce-scatter (sum),
//! broadcast and barrier, each bounded by a timeout, so a dead or stalled peer becomes an error on every
//! other rank instead of a hang.
//!
//! [`Solo`] is the world of one. [`GrpcCollective`] is the CPU backend: peer to peer over the workers'
//! own gRPC endpoints (never through the coordinator), ring algorithms (each rank sends to rank + 1 and
//! receives from rank - 1, so every link carries 2 (W - 1) / W of the data once), messages streamed in
//! bounded chunks into a mailbox keyed by (phase, sender, collective number, ring step), which drops
//! messages of a phase it has left or of another attempt of the job.
//!
//! Every rank issues the same collectives in the same order, so a per-rank counter names each one
//! consistently across ranks. Results are bitwise identical on every rank: each element of a ring
//! all-reduce is summed once, by one rank, in a fixed order, and then copied to the others, and a small
//! all-reduce (an all-gather) is summed in rank order on every rank, which keeps the replicas' weights
//! identical step after step.
//!
//! The calls block the calling thread (a training thread, never an async task) on the worker's tokio
//! runtime.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tch::Tensor;

mod grpc;
pub mod nccl;
pub mod queued;
mod ring;
pub mod tcp;

pub use grpc::{GrpcCollective, Mailbox};
pub(crate) use ring::{ring_collective, Buffer, RingExecutor, Step};
pub use ring::{
    set_latency_algorithms, set_small_all_gather_bytes, set_small_all_reduce_bytes, SMALL_ALL_GATHER_BYTES,
    SMALL_ALL_REDUCE_BYTES,
};

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
    /// Whether a restart cannot cure it: a peer that went silent or a link that broke may be back for
    /// the next attempt; a call the ranks disagree on (shapes, a root outside the world) or a set-up
    /// that cannot work as configured fails the same way every time.
    pub fn is_permanent(&self) -> bool {
        match self {
            CollectiveError::Timeout { .. } | CollectiveError::Send { .. } | CollectiveError::Link { .. } => false,
            CollectiveError::Invalid { .. } | CollectiveError::Unusable { .. } => true,
        }
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
    /// The all-gather among the `size` consecutive ranks from `first` (a BatchNorm group holding this
    /// rank), rows in rank order. Every rank of the world calls it at the same point, each with its
    /// own group. This default gathers over the whole world and keeps the group's rows; the
    /// point-to-point backends talk within the group only.
    fn group_all_gather(&self, t: &Tensor, first: usize, size: usize) -> Result<Tensor, CollectiveError> {
        Ok(group_rows(&self.all_gather(t)?, t, first, size))
    }
    /// `t`'s dimension 0 holds world-size equal blocks; returns block `rank` summed over ranks.
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError>;
    /// Rank `root`'s tensor on every rank (`t` gives the shape elsewhere).
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CollectiveError>;
    fn barrier(&self) -> Result<(), CollectiveError>;
}

/// The rows of ranks `first..first + size` in `all`, the whole world's all-gather of `t`.
pub(crate) fn group_rows(all: &Tensor, t: &Tensor, first: usize, size: usize) -> Tensor {
    let rows = t.size().first().copied().unwrap_or(1);
    all.narrow(0, first as i64 * rows, size as i64 * rows)
}

/// A u64 as four exact float32 values (16 bits each), to travel through float32 collectives.
pub fn u64_to_f32s(v: u64) -> [f32; 4] {
    [0, 16, 32, 48].map(|shift| ((v >> shift) & 0xffff) as f32)
}

/// The inverse of [`u64_to_f32s`].
pub fn f32s_to_u64(v: &[f32]) -> u64 {
    v.iter().zip([0, 16, 32, 48]).map(|(&x, shift)| (x as u64) << shift).sum()
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
    fn group_all_gather(&self, t: &Tensor, first: usize, size: usize) -> Result<Tensor, CollectiveError> {
        self.time(|c| c.group_all_gather(t, first, size))
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::grpc::CHUNK_BYTES;
    use super::*;
    use crate::testing::{loopback, to_f64};

    fn rank_data(rank: usize, n: usize) -> Vec<f32> {
        (0..n).map(|i| (rank * 1000 + i) as f32 * 0.5 - 3.0).collect()
    }

    /// Both point-to-point backends: gRPC and the TCP ring.
    type MakeGroup = fn(usize, Duration) -> loopback::Group;
    const BACKENDS: [(&str, MakeGroup); 2] = [("grpc", loopback::group), ("tcp", loopback::tcp_group)];

    /// All-reduces on both sides of `SMALL_ALL_REDUCE_BYTES` (an all-gather and an ordered sum up to
    /// it, the ring all-reduce above), in place and not, over 3 and 4 ranks: the sum of the ranks'
    /// tensors on every rank, and the same bits on every rank.
    #[test]
    fn all_reduces_below_and_above_the_small_message_size_agree_on_every_rank() {
        let at = SMALL_ALL_REDUCE_BYTES / 4;
        for (world, (backend, make)) in [3usize, 4].into_iter().flat_map(|w| BACKENDS.map(|b| (w, b))) {
            let group = make(world, Duration::from_secs(20));
            for n in [1, at, at + 1] {
                let data =
                    |rank: usize| -> Vec<f32> { (0..n).map(|i| ((rank * 7919 + i) % 1000) as f32 * 0.013).collect() };
                let results = loopback::run(&group, |rank, c| {
                    let t = Tensor::from_slice(&data(rank));
                    let sum = c.all_reduce_sum(&t).unwrap();
                    let mut in_place = t.copy();
                    c.all_reduce_sum_in_place(&mut in_place).unwrap();
                    (Vec::<f32>::try_from(&sum).unwrap(), Vec::<f32>::try_from(&in_place).unwrap())
                });
                let inputs: Vec<Vec<f32>> = (0..world).map(data).collect();
                let expected: Vec<f64> = (0..n).map(|i| inputs.iter().map(|d| f64::from(d[i])).sum()).collect();
                for (rank, (sum, in_place)) in results.iter().enumerate() {
                    assert_eq!(sum, &results[0].0, "{backend}, {world} ranks, n {n}: rank {rank} differs from rank 0");
                    assert_eq!(in_place, sum, "{backend}, {world} ranks, n {n}: in place differs");
                    let worst = sum.iter().zip(&expected).map(|(a, b)| (f64::from(*a) - b).abs()).fold(0.0, f64::max);
                    assert!(worst < 1e-3, "{backend}, {world} ranks, n {n}: off by {worst}");
                }
            }
        }
    }

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

    /// All-gathers below and above `SMALL_ALL_GATHER_BYTES` (Bruck's algorithm, the ring) and
    /// within groups of consecutive ranks, over worlds that are and are not powers of two: the
    /// definition's rows, in rank order, on every rank.
    #[test]
    fn all_gathers_small_large_and_within_groups_match_their_definition() {
        let large = SMALL_ALL_GATHER_BYTES / 4 / 3 + 1; // above the threshold from 3 ranks on
        for (world, (backend, make)) in [3usize, 5, 8].into_iter().flat_map(|w| BACKENDS.map(|b| (w, b))) {
            let group = make(world, Duration::from_secs(30));
            let groups: Vec<usize> = (1..=world).filter(|g| world % g == 0).collect();
            let results = loopback::run(&group, |rank, c| {
                let small = to_f64(&c.all_gather(&Tensor::from_slice(&rank_data(rank, 6)).view([2, 3])).unwrap());
                let big = to_f64(&c.all_gather(&Tensor::from_slice(&rank_data(rank, large))).unwrap());
                let within: Vec<Vec<f64>> = groups
                    .iter()
                    .map(|&g| {
                        let first = rank / g * g;
                        to_f64(&c.group_all_gather(&Tensor::from_slice(&rank_data(rank, 5)), first, g).unwrap())
                    })
                    .collect();
                (small, big, within)
            });
            let rows = |ranks: std::ops::Range<usize>, n: usize| -> Vec<f64> {
                ranks.flat_map(|r| rank_data(r, n)).map(f64::from).collect()
            };
            for (rank, (small, big, within)) in results.into_iter().enumerate() {
                assert_eq!(small, rows(0..world, 6), "{backend}, world {world}, rank {rank}: small all-gather");
                assert!(big == rows(0..world, large), "{backend}, world {world}, rank {rank}: large all-gather");
                for (&g, got) in groups.iter().zip(within) {
                    let first = rank / g * g;
                    assert_eq!(got, rows(first..first + g, 5), "{backend}, world {world}, group {g}, rank {rank}");
                }
            }
        }
    }

    /// A group all-gather talks within the group only: the ranks of one group finish while the ranks
    /// of the other group never call.
    #[test]
    fn a_group_all_gather_needs_only_its_own_group() {
        for (backend, make) in BACKENDS {
            let group = make(4, Duration::from_secs(5));
            let started = std::time::Instant::now();
            let results = loopback::run(&group, |rank, c| {
                (rank < 2).then(|| to_f64(&c.group_all_gather(&Tensor::from_slice(&[rank as f32]), 0, 2).unwrap()))
            });
            assert_eq!(results[0], Some(vec![0.0, 1.0]), "{backend}");
            assert_eq!(results[1], Some(vec![0.0, 1.0]), "{backend}");
            assert!(started.elapsed() < Duration::from_secs(4), "{backend} waited for the other group");
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

    /// A peer that has gone before this rank first needs a link to it (Bruck's all-gather dials the
    /// rank 2 ahead on first use): the refused connection names it at once, not after the timeout.
    #[test]
    fn a_peer_gone_before_its_first_link_is_named_at_once() {
        let group = loopback::tcp_group(4, Duration::from_secs(3));
        let alive: Vec<(usize, Arc<dyn Collective>)> =
            [0usize, 1, 3].into_iter().map(|r| (r, Arc::clone(&group.members[r]))).collect();
        drop(group); // rank 2's only handle: its listener and links close
        let results: Vec<(usize, Result<Tensor, CollectiveError>, Duration)> = std::thread::scope(|s| {
            // Rank 1 stays alive but idle (rank 0's first send to it just waits in its socket), so
            // its own failure cannot close rank 0's links before rank 0 reaches rank 2.
            let handles: Vec<_> = alive
                .iter()
                .filter(|(r, _)| *r != 1)
                .map(|(r, c)| {
                    s.spawn(move || {
                        let started = std::time::Instant::now();
                        let out = c.all_gather(&Tensor::from_slice(&[*r as f32; 4]));
                        (*r, out, started.elapsed())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Rank 0: step 1 dials rank 2, which refuses.
        let (_, out, took) = &results[0];
        let err = out.as_ref().unwrap_err().to_string();
        assert!(err.contains("rank 2") && err.contains("refused"), "{err}");
        assert!(*took < Duration::from_millis(2500), "took {took:?}");
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
