//! Synchronised BatchNorm: statistics over the global batch in the forward pass, and the matching
//! gradient terms summed over the ranks in the backward pass, so that BatchNorm is world-size
//! invariant (SimCLR's global BN: with per-worker statistics a view can find its partner through them).
//!
//! tch has no custom autograd functions, so the backward is split explicitly. In the forward pass every
//! BatchNorm input `x` and every residual block's output is cut: the rest of the network sees a fresh
//! leaf (`x.detach()` with `requires_grad`), and the cut remembers where it came from. A BatchNorm
//! normalises its leaf with the global mean and (biased) variance, themselves leaves: each rank's
//! per-channel count, mean and variance are all-gathered and combined in a fixed rank order (the
//! parallel-variance formula, stable in f64). The running statistics take the global values (unbiased
//! variance over the global count), as in one process holding the whole batch.
//!
//! Backward ([`SyncNorm::backward`]) starts at the projection output with the gradient the loss gives
//! it, then visits the cuts in reverse order. By then everything that depends on a cut has been
//! differentiated, so its leaf holds its complete local gradient. At a BatchNorm cut the gradients of
//! the loss with respect to the global mean and variance are summed over the ranks (one all-reduce of
//! 2C values per layer, as PyTorch's SyncBatchNorm does), and the input's gradient becomes
//!   dL/dx_i = (direct term) + G_mean / N + G_var * 2 (x_i - mean) / N,
//! N being the global count, because mean = sum(x)/N and var = sum((x - mean)^2)/N. Then the gradient
//! continues below the cut from the tensor it came from. Cutting at every block output means each node
//! of the graph is differentiated exactly once.

use tch::nn;
use tch::{Kind, Tensor};

use crate::comm::{Collective, CollectiveError};
use crate::engine::model::NormPass;

/// torchvision's BatchNorm defaults.
const EPS: f64 = 1e-5;
const MOMENTUM: f64 = 0.1;

struct Stats {
    mean: Tensor,
    var: Tensor,
    count: f64,
    shape: Vec<i64>,
}

struct Cut {
    /// The tensor in the graph below the cut.
    source: Tensor,
    /// What the graph above the cut used instead.
    leaf: Tensor,
    stats: Option<Stats>,
}

/// A training-mode forward pass with global BatchNorm statistics, and its backward.
pub struct SyncNorm<'c> {
    collective: &'c dyn Collective,
    cuts: Vec<Cut>,
    error: Option<CollectiveError>,
}

impl<'c> SyncNorm<'c> {
    pub fn new(collective: &'c dyn Collective) -> SyncNorm<'c> {
        SyncNorm { collective, cuts: Vec::new(), error: None }
    }

    /// Back-propagates `grad` (the loss's gradient with respect to `output`, the pass's final tensor)
    /// through the whole pass, with the ranks' BatchNorm gradient terms summed. Accumulates into the
    /// parameters' `grad`, like `backward()`.
    pub fn backward(mut self, output: &Tensor, grad: &Tensor) -> Result<(), CollectiveError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        backward_from(output, grad);
        let world = self.collective.world_size();
        while let Some(cut) = self.cuts.pop() {
            let g = cut.leaf.grad();
            if !g.defined() {
                continue;
            }
            let g = match &cut.stats {
                None => g,
                Some(s) => {
                    let zeros = || Tensor::zeros_like(&s.mean);
                    let (gm, gv) = (s.mean.grad(), s.var.grad());
                    let gm = if gm.defined() { gm } else { zeros() };
                    let gv = if gv.defined() { gv } else { zeros() };
                    let both = Tensor::cat(&[gm, gv], 0);
                    let both = if world > 1 { self.collective.all_reduce_sum(&both)? } else { both };
                    let c = s.mean.size()[0];
                    let (gm, gv) =
                        (both.narrow(0, 0, c).view(s.shape.as_slice()), both.narrow(0, c, c).view(s.shape.as_slice()));
                    let centered = cut.leaf.detach() - s.mean.detach().view(s.shape.as_slice());
                    g + gm / s.count + gv * centered * (2.0 / s.count)
                }
            };
            backward_from(&cut.source, &g);
        }
        Ok(())
    }
}

/// Accumulates d(sum(t * grad))/d(leaves): the backward of `t` with the incoming gradient `grad`.
fn backward_from(t: &Tensor, grad: &Tensor) {
    if t.requires_grad() {
        (t * grad.detach()).sum(Kind::Float).backward();
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
        let c = x.size()[1];
        let dims: Vec<i64> = if x.dim() == 4 { vec![0, 2, 3] } else { vec![0] };
        let mut shape = vec![1i64; x.dim()];
        shape[1] = c;
        let local_count = (x.numel() as i64 / c) as f64;
        let (var, mean) = x.detach().var_mean_correction(dims.as_slice(), 0, false);
        let local = Tensor::cat(
            &[
                Tensor::from_slice(&[local_count as f32]).to_device(x.device()),
                mean.to_kind(Kind::Float),
                var.to_kind(Kind::Float),
            ],
            0,
        )
        .view([1, 1 + 2 * c]);
        let all = match self.collective.all_gather(&local) {
            Ok(all) => all.to_kind(Kind::Double),
            Err(e) => {
                self.error = Some(e);
                return x.shallow_clone();
            }
        };
        let counts = all.narrow(1, 0, 1);
        let count = counts.sum(Kind::Double).double_value(&[]);
        let means = all.narrow(1, 1, c);
        let vars = all.narrow(1, 1 + c, c);
        let mean = (&means * &counts).sum_dim_intlist([0i64].as_slice(), false, Kind::Double) / count;
        let var = ((vars + (&means - mean.unsqueeze(0)).square()) * &counts).sum_dim_intlist(
            [0i64].as_slice(),
            false,
            Kind::Double,
        ) / count;
        tch::no_grad(|| {
            let unbiased = if count > 1.0 { &var * (count / (count - 1.0)) } else { var.shallow_clone() };
            let kind = bn.running_mean.kind();
            let rm = &bn.running_mean * (1.0 - MOMENTUM) + mean.to_kind(kind) * MOMENTUM;
            let rv = &bn.running_var * (1.0 - MOMENTUM) + unbiased.to_kind(kind) * MOMENTUM;
            bn.running_mean.shallow_clone().copy_(&rm);
            bn.running_var.shallow_clone().copy_(&rv);
        });
        let kind = x.kind();
        let mean = mean.to_kind(kind).set_requires_grad(true);
        let var = var.to_kind(kind).set_requires_grad(true);
        let leaf = x.detach().set_requires_grad(true);
        let mut y = (&leaf - mean.view(shape.as_slice())) * (var.view(shape.as_slice()) + EPS).rsqrt();
        if let Some(w) = &bn.ws {
            y = y.g_mul(&w.view(shape.as_slice()));
        }
        if let Some(b) = &bn.bs {
            y = y.g_add(&b.view(shape.as_slice()));
        }
        self.cuts.push(Cut { source: x.shallow_clone(), leaf, stats: Some(Stats { mean, var, count, shape }) });
        y
    }

    fn cut(&mut self, x: Tensor) -> Tensor {
        if self.error.is_some() || !x.requires_grad() {
            return x;
        }
        let leaf = x.detach().set_requires_grad(true);
        self.cuts.push(Cut { source: x, leaf: leaf.shallow_clone(), stats: None });
        leaf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::Solo;
    use crate::engine::model::{with_torch_seed, Encoder, EncoderConfig};
    use crate::testing::loopback;
    use crate::testing::to_f64;
    use tch::Device;

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
        let images = with_torch_seed(5, || Tensor::rand([6, 1, 32, 32], (Kind::Float, Device::Cpu)));
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
            assert!(close(a, b, 1e-4), "{name}: {:?} vs {:?}", &a[..a.len().min(4)], &b[..b.len().min(4)]);
        }
        let running = |vs: &nn::VarStore| to_f64(&vs.variables()["layer2.0.bn1.running_var"]);
        assert!(close(&running(&vs_b), &running(&vs_a), 1e-5));
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
