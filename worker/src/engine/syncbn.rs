//! Synchronised BatchNorm: statistics over the global batch in the forward pass, and the matching
//! gradient terms summed over the ranks in the backward pass, so that BatchNorm is world-size
//! invariant (SimCLR's global BN: with per-worker statistics a view can find its partner through them).
//!
//! tch cannot define autograd functions, so the layer is one written in C++ against libtorch
//! (`worker/csrc/sync_batch_norm.cpp`, built by `build.rs`), as PyTorch's SyncBatchNorm is. The
//! collectives stay here: the C++ function calls back into [`Collective`] through a C function
//! pointer, once per layer in the forward and once in the backward, so the whole backward pass is one
//! call into libtorch's autograd engine and no value is read back to the host.
//!
//! Forward: each rank's per-channel count, mean and (biased) variance are all-gathered (one message
//! of 1 + 2C floats per layer) and combined in a fixed rank order (the parallel-variance formula, in
//! f64). The output is (x - mean) * weight * invstd + bias with the global statistics, the centred
//! input formed first (libtorch's inference-mode kernel folds the mean into the bias, which cancels
//! where a channel's mean is far larger than its spread); the centred input is what the backward keeps. The running statistics take the global values (unbiased variance over
//! the global count), as in one process holding the whole batch.
//!
//! Backward: with N the global count, mean = sum(x)/N and var = sum((x - mean)^2)/N over the global
//! batch, so the input's gradient needs two per-channel sums over every rank's share:
//!   S1 = sum(dy), S2 = sum(dy * (x - mean)),
//!   dL/dx_i = (dy_i - S1 / N - (x_i - mean) * invstd^2 * S2 / N) * invstd * weight,
//! where invstd = 1 / sqrt(var + eps). Each rank sums its share, one all-reduce of 2C values per layer
//! adds them up (PyTorch's SyncBatchNorm exchanges the same sums), and the weight's and bias's
//! gradients (S2 * invstd and S1 over this rank's share) are summed over the ranks with the other
//! parameter gradients. On CUDA the sums and the input gradient are libtorch's fused SyncBatchNorm
//! kernels (`batch_norm_backward_reduce`, `batch_norm_backward_elemt`).

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::Mutex;

use tch::nn;
use tch::Tensor;
use torch_sys::C_tensor;

use crate::comm::{Collective, CollectiveError};

/// A collective over one BatchNorm group of consecutive ranks (`pretrain.bn_group_size`), for
/// synchronised BatchNorm's two operations: the all-gather collects the group's rows, the all-reduce
/// sums the group's values in rank order. Both are group all-gathers
/// ([`Collective::group_all_gather`]): on the point-to-point backends the messages stay within the
/// group (log2 of the group's size steps), on NCCL they travel over the whole world.
pub struct Grouped<'c> {
    inner: &'c dyn Collective,
    size: usize,
}

impl<'c> Grouped<'c> {
    /// Groups of `size` ranks (a divisor of the world size).
    pub fn new(inner: &'c dyn Collective, size: usize) -> Grouped<'c> {
        Grouped { inner, size }
    }

    fn first(&self) -> usize {
        self.inner.rank() / self.size * self.size
    }
}

impl Collective for Grouped<'_> {
    fn rank(&self) -> usize {
        self.inner.rank() - self.first()
    }
    fn world_size(&self) -> usize {
        self.size
    }
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        let group = self.inner.group_all_gather(&t.unsqueeze(0), self.first(), self.size)?;
        // In rank order, the same on every rank of the group.
        let mut sum = group.get(0);
        for k in 1..self.size as i64 {
            sum += group.get(k);
        }
        Ok(sum)
    }
    fn all_gather(&self, t: &Tensor) -> Result<Tensor, CollectiveError> {
        self.inner.group_all_gather(t, self.first(), self.size)
    }
    fn reduce_scatter_sum(&self, _t: &Tensor) -> Result<Tensor, CollectiveError> {
        Err(CollectiveError::Invalid { op: "reduce-scatter", message: "not defined within a BatchNorm group".into() })
    }
    fn broadcast(&self, _t: &Tensor, _root: usize) -> Result<Tensor, CollectiveError> {
        Err(CollectiveError::Invalid { op: "broadcast", message: "not defined within a BatchNorm group".into() })
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        self.inner.barrier()
    }
}
use crate::engine::model::NormPass;

/// torchvision's BatchNorm defaults.
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

/// The C++ side's call into a collective: op 0 all-gathers, op 1 all-reduces; a new tensor, or null
/// when the collective failed.
type CollectiveFn = unsafe extern "C" fn(*mut c_void, c_int, *const C_tensor) -> *mut C_tensor;

extern "C" {
    fn simclr_sync_batch_norm(
        x: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        running_mean: *const C_tensor,
        running_var: *const C_tensor,
        eps: f64,
        momentum: f64,
        call: CollectiveFn,
        context: *mut c_void,
    ) -> *mut C_tensor;
    fn simclr_backward_with_grad(output: *const C_tensor, grad: *const C_tensor) -> c_int;
    fn simclr_sync_batch_norm_error() -> *const c_char;
}

/// What the C++ function calls back into: the collective, and the first error it returned.
struct Bridge<'c> {
    collective: &'c dyn Collective,
    error: Mutex<Option<CollectiveError>>,
}

/// Runs on the thread that drives the pass (the autograd engine's device thread on CUDA).
unsafe extern "C" fn call_collective(context: *mut c_void, op: c_int, input: *const C_tensor) -> *mut C_tensor {
    let bridge = &*(context as *const Bridge<'_>);
    let input = Tensor::clone_from_ptr(input as *mut C_tensor);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match op {
        0 => bridge.collective.all_gather(&input),
        _ => bridge.collective.all_reduce_sum(&input),
    }));
    let error = match result {
        Ok(Ok(mut out)) => {
            let ptr = out.as_mut_ptr();
            // The C++ side owns it now (and deletes it).
            std::mem::forget(out);
            return ptr;
        }
        Ok(Err(e)) => e,
        Err(_) => CollectiveError::Invalid {
            op: if op == 0 { "sync batch norm all-gather" } else { "sync batch norm all-reduce" },
            message: "the collective panicked".into(),
        },
    };
    let mut slot = bridge.error.lock().unwrap_or_else(|e| e.into_inner());
    slot.get_or_insert(error);
    std::ptr::null_mut()
}

fn last_error() -> String {
    unsafe { CStr::from_ptr(simclr_sync_batch_norm_error()) }.to_string_lossy().into_owned()
}

/// A training-mode forward pass with global BatchNorm statistics, and its backward.
pub struct SyncNorm<'c> {
    bridge: Box<Bridge<'c>>,
    /// A failed forward collective: the step fails at `backward`.
    error: Option<CollectiveError>,
}

impl<'c> SyncNorm<'c> {
    pub fn new(collective: &'c dyn Collective) -> SyncNorm<'c> {
        SyncNorm { bridge: Box::new(Bridge { collective, error: Mutex::new(None) }), error: None }
    }

    fn take_bridge_error(&self) -> Option<CollectiveError> {
        self.bridge.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Back-propagates `grad` (the loss's gradient with respect to `output`, the pass's final tensor)
    /// through the whole pass, with the ranks' BatchNorm gradient sums all-reduced. Accumulates into
    /// the parameters' `grad`, like `backward()`.
    pub fn backward(mut self, output: &Tensor, grad: &Tensor) -> Result<(), CollectiveError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if !output.requires_grad() {
            return Ok(());
        }
        let grad = grad.detach();
        // The pass's graph holds pointers to the bridge, which lives until this returns.
        let status = unsafe { simclr_backward_with_grad(output.as_ptr(), grad.as_ptr()) };
        if status == 0 {
            return Ok(());
        }
        Err(self
            .take_bridge_error()
            .unwrap_or_else(|| CollectiveError::Invalid { op: "sync batch norm backward", message: last_error() }))
    }
}

impl NormPass for SyncNorm<'_> {
    fn train(&self) -> bool {
        true
    }

    fn norm(&mut self, bn: &nn::BatchNorm, x: &Tensor) -> Tensor {
        if self.error.is_some() {
            // The step fails at `backward`; finish the forward pass cheaply meanwhile.
            return x.shallow_clone();
        }
        let undefined = Tensor::new();
        let weight = bn.ws.as_ref().unwrap_or(&undefined);
        let bias = bn.bs.as_ref().unwrap_or(&undefined);
        let context = &*self.bridge as *const Bridge<'_> as *mut c_void;
        let y = unsafe {
            simclr_sync_batch_norm(
                x.as_ptr(),
                weight.as_ptr(),
                bias.as_ptr(),
                bn.running_mean.as_ptr(),
                bn.running_var.as_ptr(),
                EPS,
                MOMENTUM,
                call_collective,
                context,
            )
        };
        if y.is_null() {
            let error = self
                .take_bridge_error()
                .unwrap_or_else(|| CollectiveError::Invalid { op: "sync batch norm forward", message: last_error() });
            self.error = Some(error);
            return x.shallow_clone();
        }
        unsafe { Tensor::from_ptr(y) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Solo;
    use crate::engine::model::{with_torch_seed, Encoder, EncoderConfig};
    use crate::testing::loopback;
    use crate::testing::to_f64;
    use tch::{Device, Kind};

    fn model(seed: u64) -> (nn::VarStore, Encoder) {
        with_torch_seed(seed, || {
            let vs = nn::VarStore::new(Device::Cpu);
            let encoder = Encoder::new(&vs.root(), EncoderConfig::tiny());
            (vs, encoder)
        })
    }

    fn grads(vs: &nn::VarStore) -> Vec<(String, Vec<f64>)> {
        let mut v: Vec<_> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .map(|(n, t)| (n, to_f64(&t.grad())))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        let scale = b.iter().map(|x| x.abs()).fold(0.0, f64::max).max(1e-6);
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * scale)
    }

    /// A loss that mixes the images of the batch, so that the gradient flows across samples.
    fn loss_weights(n: i64, d: i64) -> Tensor {
        with_torch_seed(99, || Tensor::randn([n, d], (Kind::Float, Device::Cpu)))
    }

    #[test]
    fn one_rank_matches_plain_batchnorm_forward_and_backward() {
        // Offset 10: BatchNorm inputs whose mean is larger than their spread (the stem's
        // convolution of nearly constant images). The tolerance holds for both ways of writing the
        // arithmetic here; where the mean is far larger, folding it into the bias cancels, which
        // `bench_batchnorm`'s gradient column shows on ResNet-18.
        for offset in [0.0, 10.0] {
            let images = with_torch_seed(5, || Tensor::rand([6, 1, 32, 32], (Kind::Float, Device::Cpu))) + offset;
            let (vs_a, enc_a) = model(1);
            let h = enc_a.forward(&images, true);
            let w = loss_weights(6, h.size()[1]);
            (&h * &w).sum(Kind::Float).square().backward();
            let (vs_b, enc_b) = model(1);
            let mut pass = SyncNorm::new(&Solo);
            let h_b = enc_b.forward_with(&images, &mut pass);
            assert!(close(&to_f64(&h_b), &to_f64(&h), 1e-5));
            let g = 2.0 * (&h_b * &w).sum(Kind::Float).detach() * &w;
            pass.backward(&h_b, &g).unwrap();
            for ((name, a), (_, b)) in grads(&vs_b).iter().zip(grads(&vs_a).iter()) {
                assert!(
                    close(a, b, 1e-4),
                    "offset {offset}: {name}: {:?} vs {:?}",
                    &a[..a.len().min(4)],
                    &b[..b.len().min(4)]
                );
            }
            let running = |vs: &nn::VarStore| to_f64(&vs.variables()["layer2.0.bn1.running_var"]);
            assert!(close(&running(&vs_b), &running(&vs_a), 1e-5));
        }
    }

    #[test]
    fn ranks_splitting_a_batch_match_one_process_holding_it() {
        let n = 8i64;
        let images = with_torch_seed(6, || Tensor::rand([n, 1, 32, 32], (Kind::Float, Device::Cpu)));
        let (vs_ref, enc_ref) = model(2);
        let h = enc_ref.forward(&images, true);
        let w = loss_weights(n, h.size()[1]);
        // Sum over samples of a per-sample loss: each rank's share adds up to it.
        (&h * &w).sum(Kind::Float).backward();
        let want = grads(&vs_ref);
        let world = 4;
        let group = loopback::group(world, std::time::Duration::from_secs(30));
        let per = n / world as i64;
        let results = loopback::run(&group, |rank, c| {
            let (vs, enc) = model(2);
            let images = with_torch_seed(6, || Tensor::rand([n, 1, 32, 32], (Kind::Float, Device::Cpu)));
            let w = loss_weights(n, enc.feature_dim);
            let mut pass = SyncNorm::new(c);
            let local = images.narrow(0, rank as i64 * per, per);
            let h = enc.forward_with(&local, &mut pass);
            pass.backward(&h, &w.narrow(0, rank as i64 * per, per)).unwrap();
            // Parameter gradients summed over the ranks, as the training step does.
            grads(&vs)
                .into_iter()
                .map(|(name, g)| {
                    let summed = c.all_reduce_sum(&Tensor::from_slice(&g).to_kind(Kind::Float)).unwrap();
                    (name, to_f64(&summed))
                })
                .collect::<Vec<_>>()
        });
        for got in &results {
            for ((name, a), (_, b)) in got.iter().zip(want.iter()) {
                assert!(close(a, b, 1e-4), "{name}");
            }
        }
    }
}
