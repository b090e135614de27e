//! A collective run on a thread of its own, so that a caller can start an all-reduce and go on
//! computing (the trainer's gradient buckets, while the backward continues).
//!
//! Every call, blocking or not, joins one queue and runs in the order it was made: the ranks issue
//! their collectives in the same order (the backward runs the same graph everywhere), so they still
//! pair up, and a started all-reduce never interleaves on the wire with a synchronised BatchNorm
//! collective issued after it. The time callers spend waiting for results is the communication the
//! step does not hide ([`Queued::exposed_seconds`]). After a failed call every later one fails at
//! once with the same error.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use tch::Tensor;

use crate::comm::{Collective, CollectiveError};

/// A queued call; returns its error, if any.
type Job = Box<dyn FnOnce(&dyn Collective) -> Option<CollectiveError> + Send>;

pub struct Queued {
    inner: Arc<dyn Collective>,
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Nanoseconds callers have waited for results.
    waited: Arc<AtomicU64>,
}

/// An all-reduce started with [`Queued::start_all_reduce`].
pub struct Started {
    done: Receiver<Result<(), CollectiveError>>,
    waited: Arc<AtomicU64>,
}

impl Started {
    /// Waits until the sum is in the tensor.
    pub fn wait(self) -> Result<(), CollectiveError> {
        let t = Instant::now();
        let result = self.done.recv().unwrap_or_else(|_| Err(stopped()));
        self.waited.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }
}

fn stopped() -> CollectiveError {
    CollectiveError::Invalid { op: "collective thread", message: "the collective thread has stopped".into() }
}

impl Queued {
    pub fn new(inner: Arc<dyn Collective>) -> Queued {
        let (tx, rx) = channel::<Job>();
        let worker = Arc::clone(&inner);
        let thread = std::thread::Builder::new()
            .name("collectives".into())
            .spawn(move || {
                // After a failed collective the ranks' sequences of messages no longer match: every
                // later call fails at once with the first error (instead of each waiting for its own
                // timeout behind a frozen peer).
                let mut failed: Option<Failed> = None;
                for job in rx {
                    match &failed {
                        Some(f) => {
                            job(f);
                        }
                        None => failed = job(&*worker).map(|error| Failed { error, inner: Arc::clone(&worker) }),
                    }
                }
            })
            .expect("spawning the collective thread");
        Queued {
            inner,
            jobs: Mutex::new(Some(tx)),
            thread: Mutex::new(Some(thread)),
            waited: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Seconds callers have spent waiting for collectives (blocking calls and [`Started::wait`]).
    pub fn exposed_seconds(&self) -> f64 {
        self.waited.load(Ordering::Relaxed) as f64 * 1e-9
    }

    fn enqueue(&self, job: Job) -> Result<(), CollectiveError> {
        let jobs = self.jobs.lock().unwrap_or_else(|p| p.into_inner());
        jobs.as_ref().ok_or_else(stopped)?.send(job).map_err(|_| stopped())
    }

    /// Sums `t` over the ranks in place, in the queue's order; returns at once.
    pub fn start_all_reduce(&self, t: &Tensor) -> Result<Started, CollectiveError> {
        let (tx, rx) = sync_channel(1);
        let mut t = t.shallow_clone();
        self.enqueue(Box::new(move |c| {
            let result = c.all_reduce_sum_in_place(&mut t);
            let error = result.as_ref().err().cloned();
            let _ = tx.send(result);
            error
        }))?;
        Ok(Started { done: rx, waited: Arc::clone(&self.waited) })
    }

    /// Runs `f` in the queue's order and waits for its result.
    fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Collective) -> Result<T, CollectiveError> + Send + 'static,
    ) -> Result<T, CollectiveError> {
        let t = Instant::now();
        let (tx, rx) = sync_channel(1);
        self.enqueue(Box::new(move |c| {
            let result = f(c);
            let error = result.as_ref().err().cloned();
            let _ = tx.send(result);
            error
        }))?;
        let result = rx.recv().unwrap_or_else(|_| Err(stopped()));
        self.waited.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }
}

/// The collective after a failure: every call fails with the first error.
struct Failed {
    error: CollectiveError,
    inner: Arc<dyn Collective>,
}

impl Collective for Failed {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, _t: &Tensor) -> Result<Tensor, CollectiveError> {
        Err(self.error.clone())
    }
    fn all_reduce_sum_in_place(&self, _t: &mut Tensor) -> Result<(), CollectiveError> {
        Err(self.error.clone())
    }
    fn all_gather(&self, _t: &Tensor) -> Result<Tensor, CollectiveError> {
        Err(self.error.clone())
    }
    fn group_all_gather(&self, _t: &Tensor, _first: usize, _size: usize) -> Result<Tensor, CollectiveError> {
        Err(self.error.clone())
    }
    fn reduce_scatter_sum(&self, _t: &Tensor) -> Result<Tensor, CollectiveError> {
        Err(self.error.clone())
    }
    fn broadcast(&self, _t: &Tensor, _root: usize) -> Result<Tensor, CollectiveError> {
        Err(self.error.clone())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Err(self.error.clone())
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        drop(self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take());
        if let Some(thread) = self.thread.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = thread.join();
        }
    }
}

impl Collective for Queued {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let t = t.shallow_clone();
        self.call(move |c| c.all_reduce_sum(&t))
    }
    fn all_reduce_sum_in_place(&self, t: &mut Tensor) -> Result<(), CollectiveError> {
        let mut t = t.shallow_clone();
        self.call(move |c| c.all_reduce_sum_in_place(&mut t))
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let t = t.shallow_clone();
        self.call(move |c| c.all_gather(&t))
    }
    fn group_all_gather(&self, t: &Tensor, first: usize, size: usize) -> Result<Tensor, CollectiveError> {
        let t = t.shallow_clone();
        self.call(move |c| c.group_all_gather(&t, first, size))
    }
    fn reduce_scatter_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let t = t.shallow_clone();
        self.call(move |c| c.reduce_scatter_sum(&t))
    }
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor, CollectiveError> {
        let t = t.shallow_clone();
        self.call(move |c| c.broadcast(&t, root))
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.call(|c| c.barrier())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::loopback;

    /// Started all-reduces and blocking calls mixed, on two ranks: each result is the sum of the
    /// right tensors, so the queue kept the ranks' calls paired.
    #[test]
    fn started_and_blocking_collectives_pair_up_in_the_order_they_were_made() {
        let group = loopback::tcp_group(2, Duration::from_secs(20));
        let results = loopback::run(&group, |rank, _| {
            let q = Queued::new(Arc::clone(&group.members[rank]));
            let buckets: Vec<Tensor> = (0..5).map(|k| Tensor::from_slice(&[(rank * 10 + k) as f32; 3])).collect();
            let mut started = Vec::new();
            let mut gathered = Vec::new();
            for (k, b) in buckets.iter().enumerate() {
                started.push(q.start_all_reduce(b).unwrap());
                gathered.push(q.all_gather(&Tensor::from_slice(&[(rank * 100 + k) as f32])).unwrap());
            }
            for s in started {
                s.wait().unwrap();
            }
            let sums: Vec<f32> = buckets.iter().map(|b| b.double_value(&[0]) as f32).collect();
            let gathered: Vec<Vec<f32>> = gathered.iter().map(|g| Vec::<f32>::try_from(g).unwrap()).collect();
            (sums, gathered, q.exposed_seconds())
        });
        for (sums, gathered, exposed) in results {
            assert_eq!(sums, vec![10.0, 12.0, 14.0, 16.0, 18.0]);
            for (k, g) in gathered.iter().enumerate() {
                assert_eq!(g, &vec![k as f32, (100 + k) as f32]);
            }
            assert!(exposed > 0.0);
        }
    }

    /// A peer that stops answering: the first queued call times out, and the ones queued behind it
    /// fail at once with that error instead of each waiting out its own timeout.
    #[test]
    fn after_a_failed_collective_every_queued_call_fails_at_once() {
        let group = loopback::tcp_group(2, Duration::from_millis(300));
        let q = Queued::new(Arc::clone(&group.members[0]));
        let started = Instant::now();
        let pending: Vec<Started> =
            (0..5).map(|_| q.start_all_reduce(&Tensor::ones([4], tch::kind::FLOAT_CPU)).unwrap()).collect();
        let errors: Vec<String> = pending.into_iter().map(|p| p.wait().unwrap_err().to_string()).collect();
        let blocking = q.all_gather(&Tensor::ones([1], tch::kind::FLOAT_CPU)).unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_millis(1200), "{:?}", started.elapsed());
        assert!(errors.iter().chain([&blocking]).all(|e| e == &errors[0]), "{errors:?} {blocking}");
        assert!(errors[0].contains("rank 1"), "{}", errors[0]);
    }
}
