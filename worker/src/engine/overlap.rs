//! The sum of the parameter gradients over the ranks, in buckets that start while the backward still
//! runs (as PyTorch's DistributedDataParallel does).
//!
//! Each parameter gets a hook that runs once its gradient of this backward is complete
//! (`worker/csrc/grad_hooks.cpp`). The hook copies the gradient into its bucket's flat buffer; when a
//! bucket is full it is handed to the collective thread ([`Queued`]), which sums it over the ranks while
//! the backward goes on. Buckets start strictly in their order, so every rank issues the same
//! all-reduces in the same order, whatever order its hooks ran in. After the backward the trainer
//! waits for the buckets and copies the sums back into the gradients.
//!
//! The buckets take the parameters in reverse order of their names (given sorted): the head first, then
//! the encoder's last stage down to its stem, about the order the backward completes them. The layout
//! depends on the names alone, so it is the same on every rank, from the first step on, and after a
//! restart from a checkpoint: a resumed run sums every gradient exactly as the uninterrupted one did.
//! With 2 ranks the sums do not depend on the buckets at all; with more, the ring's chunks (and so the
//! order each element's terms are added in) follow the buffers, so `bucket_bytes` moves results by
//! float rounding, as the world size does.

use std::ffi::{c_int, c_void};
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use tch::{Device, Kind, Tensor};
use torch_sys::C_tensor;

use crate::comm::queued::{Queued, Started};
use crate::comm::{Collective, CollectiveError};

extern "C" {
    fn simclr_set_grad_ready_hook(
        t: *const C_tensor,
        call: extern "C" fn(*mut c_void, i64),
        context: *mut c_void,
        index: i64,
    ) -> c_int;
    fn simclr_clear_grad_ready_hook(t: *const C_tensor);
}

/// Sums the gradients of `params` over the ranks of a [`Queued`] collective.
pub struct GradReducer {
    /// Shared with the hooks, which hold its address: boxed so that it never moves, and the hooks are
    /// removed before it is freed.
    state: Box<Mutex<State>>,
    hooked: bool,
}

struct State {
    params: Vec<Tensor>,
    queue: Arc<Queued>,
    bucket_bytes: usize,
    mode: Mode,
    /// The buckets (none with `bucket_bytes = 0`).
    layout: Option<Layout>,
    /// The flat buffer of the one all-reduce after the backward (without buckets).
    flat: Option<Tensor>,
    /// What went wrong inside a hook (reported after the backward).
    error: Option<CollectiveError>,
    /// Buckets started by the hooks during the last backward (before `finish`).
    started_in_backward: usize,
}

enum Mode {
    Idle,
    Overlap(Progress),
}

struct Layout {
    buckets: Vec<Bucket>,
    /// Per parameter: its bucket and its offset in the bucket's buffer.
    place: Vec<(usize, i64)>,
}

struct Bucket {
    members: Vec<usize>,
    flat: Tensor,
}

/// One backward's buckets.
struct Progress {
    ready: Vec<bool>,
    /// Gradients each bucket still waits for.
    missing: Vec<usize>,
    /// The next bucket to start.
    next: usize,
    started: Vec<Started>,
}

impl GradReducer {
    /// A reducer for `params` (sorted by name, the same list on every rank); `bucket_bytes` 0: one
    /// all-reduce after the backward, no hooks.
    pub fn new(params: Vec<Tensor>, queue: Arc<Queued>, bucket_bytes: usize) -> Result<GradReducer, String> {
        let mut state = State {
            params,
            queue,
            bucket_bytes,
            mode: Mode::Idle,
            layout: None,
            flat: None,
            error: None,
            started_in_backward: 0,
        };
        if bucket_bytes > 0 {
            let order: Vec<usize> = (0..state.params.len()).rev().collect();
            state.layout = Some(state.build_layout(&order));
        }
        let mut reducer = GradReducer { state: Box::new(Mutex::new(state)), hooked: false };
        if bucket_bytes > 0 {
            let context = &*reducer.state as *const Mutex<State> as *mut c_void;
            let state = reducer.lock();
            for (i, p) in state.params.iter().enumerate() {
                // SAFETY: the tensor is alive; the context outlives the hook (removed in Drop).
                if unsafe { simclr_set_grad_ready_hook(p.as_ptr(), grad_ready, context, i as i64) } != 0 {
                    return Err(format!("parameter {i} is not a leaf that requires a gradient"));
                }
            }
            drop(state);
            reducer.hooked = true;
        }
        Ok(reducer)
    }

    /// Buckets in use (0 without buckets).
    pub fn buckets(&self) -> usize {
        self.lock().layout.as_ref().map_or(0, |l| l.buckets.len())
    }

    /// All-reduces the hooks started in the last backward (0 without buckets).
    pub fn started_in_backward(&self) -> usize {
        self.lock().started_in_backward
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Before the backward: the hooks start the buckets as their gradients come.
    pub fn begin(&mut self) {
        let mut s = self.lock();
        s.error = None;
        s.mode = match &s.layout {
            None => Mode::Idle,
            Some(layout) => Mode::Overlap(Progress {
                ready: vec![false; s.params.len()],
                missing: layout.buckets.iter().map(|b| b.members.len()).collect(),
                next: 0,
                started: Vec::new(),
            }),
        };
    }

    /// After the backward: every gradient is the sum over the ranks.
    pub fn finish(&mut self) -> Result<(), CollectiveError> {
        let mut s = self.lock();
        let mode = std::mem::replace(&mut s.mode, Mode::Idle);
        if let Some(e) = s.error.take() {
            if let Mode::Overlap(progress) = mode {
                // The buckets already started are in flight on every rank: let them end.
                for started in progress.started {
                    let _ = started.wait();
                }
            }
            return Err(e);
        }
        match mode {
            Mode::Idle => s.all_reduce_flat(),
            Mode::Overlap(mut progress) => {
                s.started_in_backward = progress.started.len();
                // Gradients whose hooks did not run (parameters this backward did not reach keep their
                // zeroed gradients) and the buckets they held back.
                for i in 0..s.params.len() {
                    if !progress.ready[i] {
                        s.ready(i, &mut progress)?;
                    }
                }
                let layout = s.layout.as_ref().expect("overlap mode has a layout");
                for (b, started) in progress.started.into_iter().enumerate() {
                    started.wait()?;
                    let bucket = &layout.buckets[b];
                    tch::no_grad(|| {
                        for &i in &bucket.members {
                            let g = s.params[i].grad();
                            let offset = layout.place[i].1;
                            g.shallow_clone()
                                .copy_(&bucket.flat.narrow(0, offset, g.numel() as i64).view(g.size().as_slice()));
                        }
                    });
                }
                Ok(())
            }
        }
    }
}

impl State {
    /// Every gradient through one flat buffer, summed after the backward.
    fn all_reduce_flat(&mut self) -> Result<(), CollectiveError> {
        let grads: Vec<Tensor> = self.params.iter().map(|p| p.grad()).collect();
        let total: i64 = grads.iter().map(|g| g.numel() as i64).sum();
        let device = grads.first().map_or(Device::Cpu, |g| g.device());
        // Kept from step to step: a fresh buffer would cost its page faults every time (tens of
        // milliseconds for ResNet-18's 45 MB, as much as the transfer).
        let mut flat = match self.flat.take() {
            Some(buffer) if buffer.numel() as i64 == total => buffer,
            _ => Tensor::zeros([total], (Kind::Float, device)),
        };
        tch::no_grad(|| {
            let mut offset = 0;
            for g in &grads {
                let numel = g.numel() as i64;
                // reshape: a channels-last gradient is not viewable as flat.
                flat.narrow(0, offset, numel).copy_(&g.detach().reshape([-1]));
                offset += numel;
            }
        });
        self.queue.all_reduce_sum_in_place(&mut flat)?;
        tch::no_grad(|| {
            let mut offset = 0;
            for g in &grads {
                let numel = g.numel() as i64;
                g.shallow_clone().copy_(&flat.narrow(0, offset, numel).view(g.size().as_slice()));
                offset += numel;
            }
        });
        self.flat = Some(flat);
        Ok(())
    }

    fn build_layout(&self, order: &[usize]) -> Layout {
        let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
        let mut bytes = 0;
        for &i in order {
            if bytes >= self.bucket_bytes {
                groups.push(Vec::new());
                bytes = 0;
            }
            groups.last_mut().expect("one group at least").push(i);
            bytes += self.params[i].numel() * 4;
        }
        let mut place = vec![(0, 0); self.params.len()];
        let buckets = groups
            .into_iter()
            .enumerate()
            .map(|(b, members)| {
                let mut offset = 0;
                for &i in &members {
                    place[i] = (b, offset);
                    offset += self.params[i].numel() as i64;
                }
                let device = self.params[members[0]].device();
                Bucket { members, flat: Tensor::zeros([offset], (Kind::Float, device)) }
            })
            .collect();
        Layout { buckets, place }
    }

    /// Parameter `i`'s gradient is complete: into its bucket, and start every bucket that is full and
    /// next in order.
    fn ready(&mut self, i: usize, progress: &mut Progress) -> Result<(), CollectiveError> {
        if std::mem::replace(&mut progress.ready[i], true) {
            return Ok(());
        }
        let layout = self.layout.as_ref().expect("overlap mode has a layout");
        let (b, offset) = layout.place[i];
        let g = self.params[i].grad();
        tch::no_grad(|| {
            layout.buckets[b].flat.narrow(0, offset, g.numel() as i64).copy_(&g.detach().reshape([-1]));
        });
        progress.missing[b] -= 1;
        while progress.next < layout.buckets.len() && progress.missing[progress.next] == 0 {
            let started = self.queue.start_all_reduce(&layout.buckets[progress.next].flat)?;
            progress.started.push(started);
            progress.next += 1;
        }
        Ok(())
    }

    fn on_hook(&mut self, i: usize) {
        let mut mode = std::mem::replace(&mut self.mode, Mode::Idle);
        match &mut mode {
            Mode::Idle => {}
            Mode::Overlap(progress) => {
                if let Err(e) = self.ready(i, progress) {
                    self.error.get_or_insert(e);
                }
            }
        }
        self.mode = mode;
    }
}

/// The hook's way back into Rust; never unwinds into libtorch.
extern "C" fn grad_ready(context: *mut c_void, index: i64) {
    // SAFETY: `context` is the reducer's boxed state, alive while the hooks are set.
    let state = unsafe { &*(context as *const Mutex<State>) };
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
        state.lock().unwrap_or_else(|p| p.into_inner()).on_hook(index as usize);
    }));
    if outcome.is_err() {
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        s.error.get_or_insert(CollectiveError::Invalid {
            op: "gradient buckets",
            message: format!("the hook of parameter {index} panicked"),
        });
    }
}

impl Drop for GradReducer {
    fn drop(&mut self) {
        if self.hooked {
            for p in &self.lock().params {
                // SAFETY: the tensor is alive.
                unsafe { simclr_clear_grad_ready_hook(p.as_ptr()) };
            }
        }
    }
}
