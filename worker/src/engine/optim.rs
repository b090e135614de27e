//! Optimisers and the learning-rate schedule of SimCLR pretraining and of the probes.
//!
//! * LARS (You et al. 2017, as SimCLR uses it): for an adapted parameter w with gradient g,
//!   d = g + wd * w, trust = eta * ||w|| / ||d|| (1 when either norm is 0), v = m * v + lr * trust * d,
//!   w = w - v. Biases and BatchNorm parameters are excluded: no weight decay, trust 1.
//! * SGD with momentum (optionally Nesterov), PyTorch's formulation: d = g + wd * w, b = m * b + d
//!   (b = d at the first step), w = w - lr * (d + m * b if Nesterov else b).
//! * AdamW (Loshchilov and Hutter), PyTorch's formulation: w = w * (1 - lr * wd), then Adam with bias
//!   correction: w = w - lr * m_hat / (sqrt(v_hat) + eps).
//!
//! Every update runs on the parameters' own device without autograd. The state (momentum buffers,
//! moments, step) is exposed by name, for checkpoints that resume exactly.

use tch::{Kind, Tensor};

/// One trainable tensor and whether weight decay and LARS adaptation apply to it.
#[derive(Debug)]
pub struct Param {
    pub name: String,
    pub tensor: Tensor,
    /// False for biases and BatchNorm parameters (SimCLR excludes them from both).
    pub adapted: bool,
}

impl Param {
    /// The convention SimCLR follows: 1-D parameters (biases, BatchNorm weight and bias) are excluded.
    pub fn new(name: impl Into<String>, tensor: Tensor) -> Param {
        let adapted = tensor.dim() > 1;
        Param { name: name.into(), tensor, adapted }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Algorithm {
    Lars { momentum: f64, trust_coefficient: f64, weight_decay: f64 },
    Sgd { momentum: f64, nesterov: bool, weight_decay: f64 },
    AdamW { beta1: f64, beta2: f64, eps: f64, weight_decay: f64 },
}

impl Algorithm {
    /// SimCLR's pretraining optimiser: LARS, momentum 0.9, trust coefficient 0.001, weight decay 1e-6.
    pub fn simclr_lars() -> Algorithm {
        Algorithm::Lars { momentum: 0.9, trust_coefficient: 0.001, weight_decay: 1e-6 }
    }
}

pub struct Optimizer {
    algorithm: Algorithm,
    params: Vec<Param>,
    /// Per parameter: the momentum buffer (LARS, SGD) or the first moment (AdamW).
    first: Vec<Option<Tensor>>,
    /// Per parameter: AdamW's second moment.
    second: Vec<Option<Tensor>>,
    steps: i64,
}

impl Optimizer {
    pub fn new(algorithm: Algorithm, params: Vec<Param>) -> Optimizer {
        let n = params.len();
        Optimizer {
            algorithm,
            params,
            first: (0..n).map(|_| None).collect(),
            second: (0..n).map(|_| None).collect(),
            steps: 0,
        }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn steps(&self) -> i64 {
        self.steps
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            let mut grad = p.tensor.grad();
            if grad.defined() {
                let _ = grad.detach_().zero_();
            }
        }
    }

    /// One update with learning rate `lr`, from the gradients autograd left on the parameters.
    /// Parameters without a gradient are left alone.
    pub fn step(&mut self, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let t = self.steps;
        for (i, p) in self.params.iter_mut().enumerate() {
            let grad = p.tensor.grad();
            if !grad.defined() {
                continue;
            }
            let w = &mut p.tensor;
            match self.algorithm {
                Algorithm::Lars { momentum, trust_coefficient, weight_decay } => {
                    // The trust ratio stays on the device (no read-back per parameter, which would
                    // stall a GPU once per layer): a 0-dim double, lr * eta * |w| / |d|, or lr where
                    // either norm is 0. Multiplying the f32 update by it rounds exactly as multiplying
                    // by the same value as a host scalar does.
                    let scaled = if p.adapted {
                        let d = &grad + &*w * weight_decay;
                        let w_norm = w.norm().to_kind(Kind::Double);
                        let d_norm = d.norm().to_kind(Kind::Double);
                        let usable = w_norm.gt(0.0).logical_and(&d_norm.gt(0.0));
                        let trust = (&w_norm * trust_coefficient / &d_norm).where_self(&usable, &w_norm.ones_like());
                        d * (trust * lr)
                    } else {
                        &grad * lr
                    };
                    // In place: v = m * v + scaled, w = w - v.
                    let v = match self.first[i].take() {
                        Some(mut v) => {
                            let _ = v.g_mul_scalar_(momentum).g_add_(&scaled);
                            v
                        }
                        None => scaled,
                    };
                    let _ = w.g_sub_(&v);
                    self.first[i] = Some(v);
                }
                Algorithm::Sgd { momentum, nesterov, weight_decay } => {
                    let wd = if p.adapted { weight_decay } else { 0.0 };
                    let d = &grad + &*w * wd;
                    let update = if momentum == 0.0 {
                        d
                    } else {
                        let b = match self.first[i].take() {
                            Some(mut b) => {
                                let _ = b.g_mul_scalar_(momentum).g_add_(&d);
                                b
                            }
                            None => d.copy(),
                        };
                        let update = if nesterov { &d + &b * momentum } else { b.shallow_clone() };
                        self.first[i] = Some(b);
                        update
                    };
                    let _ = w.g_sub_(&(update * lr));
                }
                Algorithm::AdamW { beta1, beta2, eps, weight_decay } => {
                    let wd = if p.adapted { weight_decay } else { 0.0 };
                    let _ = w.g_mul_scalar_(1.0 - lr * wd);
                    let m = match self.first[i].take() {
                        Some(m) => m * beta1 + &grad * (1.0 - beta1),
                        None => &grad * (1.0 - beta1),
                    };
                    let v = match self.second[i].take() {
                        Some(v) => v * beta2 + grad.square() * (1.0 - beta2),
                        None => grad.square() * (1.0 - beta2),
                    };
                    let m_hat = &m / (1.0 - beta1.powi(t as i32));
                    let v_hat = &v / (1.0 - beta2.powi(t as i32));
                    let _ = w.g_sub_(&(m_hat / (v_hat.sqrt() + eps) * lr));
                    self.first[i] = Some(m);
                    self.second[i] = Some(v);
                }
            }
        }
    }

    /// The state by name (`<param>.first`, `<param>.second`, and `steps`), for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("steps".to_string(), Tensor::from(self.steps))];
        for (i, p) in self.params.iter().enumerate() {
            if let Some(t) = &self.first[i] {
                out.push((format!("{}.first", p.name), t.shallow_clone()));
            }
            if let Some(t) = &self.second[i] {
                out.push((format!("{}.second", p.name), t.shallow_clone()));
            }
        }
        out
    }

    /// Restores what [`Optimizer::state`] gave; a buffer of the wrong shape or an unknown name is an error.
    pub fn load_state(&mut self, state: &[(String, Tensor)]) -> Result<(), String> {
        for (name, tensor) in state {
            if name == "steps" {
                self.steps = tensor.int64_value(&[]);
                continue;
            }
            let (param, slot) = name.rsplit_once('.').ok_or_else(|| format!("optimiser state '{name}'"))?;
            let i = self
                .params
                .iter()
                .position(|p| p.name == param)
                .ok_or_else(|| format!("optimiser state for unknown parameter '{param}'"))?;
            if tensor.size() != self.params[i].tensor.size() {
                return Err(format!(
                    "optimiser state '{name}' has shape {:?}, the parameter {:?}",
                    tensor.size(),
                    self.params[i].tensor.size()
                ));
            }
            let value = tensor.to_device(self.params[i].tensor.device()).to_kind(self.params[i].tensor.kind());
            match slot {
                "first" => self.first[i] = Some(value),
                "second" => self.second[i] = Some(value),
                other => return Err(format!("optimiser state slot '{other}' of '{param}'")),
            }
        }
        Ok(())
    }
}

/// How the peak learning rate follows the global batch size B.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrScaling {
    /// base * B / 256 (SimCLR: base 0.3).
    Linear,
    /// base * sqrt(B) (SimCLR: base 0.075, better for small batches and long runs).
    Sqrt,
    /// base as given.
    None,
}

pub fn scaled_lr(base: f64, batch: usize, scaling: LrScaling) -> f64 {
    match scaling {
        LrScaling::Linear => base * batch as f64 / 256.0,
        LrScaling::Sqrt => base * (batch as f64).sqrt(),
        LrScaling::None => base,
    }
}

/// Linear warmup from 0 to `peak` over `warmup` steps, then cosine decay to 0 at `total` steps
/// (SimCLR's schedule). `step` counts from 0.
pub fn warmup_cosine(peak: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return peak * step as f64 / warmup as f64;
    }
    if total <= warmup {
        return peak;
    }
    let progress = ((step - warmup) as f64 / (total - warmup) as f64).min(1.0);
    peak * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::to_f64;
    use tch::{Device, Kind};

    const W: [f64; 6] = [0.5, -1.0, 2.0, 0.25, -0.75, 1.5];
    const G: [f64; 6] = [0.1, 0.2, -0.3, 0.05, -0.15, 0.4];

    /// A 2x3 weight and a 3-element bias with gradients G (weight) and G[..3] (bias).
    fn params() -> Vec<Param> {
        let w = Tensor::from_slice(&W).view([2, 3]).set_requires_grad(true);
        let b = Tensor::from_slice(&W[..3]).set_requires_grad(true);
        (&w * Tensor::from_slice(&G).view([2, 3])).sum(Kind::Double).backward();
        (&b * Tensor::from_slice(&G[..3])).sum(Kind::Double).backward();
        vec![Param::new("layer.weight", w), Param::new("layer.bias", b)]
    }

    fn norm(v: &[f64]) -> f64 {
        v.iter().map(|x| x * x).sum::<f64>().sqrt()
    }

    fn close(got: &[f64], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} vs {want:?}");
        }
    }

    fn regrad(opt: &mut Optimizer) {
        opt.zero_grad();
        let p = &opt.params()[0].tensor;
        (p * Tensor::from_slice(&G).view([2, 3])).sum(Kind::Double).backward();
        let b = &opt.params()[1].tensor;
        (b * Tensor::from_slice(&G[..3])).sum(Kind::Double).backward();
    }

    #[test]
    fn lars_two_steps_follow_the_formula() {
        let (lr, m, eta, wd) = (0.8, 0.9, 0.001, 1e-2);
        let mut opt =
            Optimizer::new(Algorithm::Lars { momentum: m, trust_coefficient: eta, weight_decay: wd }, params());
        opt.step(lr);
        regrad(&mut opt);
        opt.step(lr);
        // Weight: adapted.
        let mut w = W.to_vec();
        let mut v = [0.0; 6];
        for _ in 0..2 {
            let d: Vec<f64> = G.iter().zip(&w).map(|(g, w)| g + wd * w).collect();
            let trust = eta * norm(&w) / norm(&d);
            for k in 0..6 {
                v[k] = m * v[k] + lr * trust * d[k];
                w[k] -= v[k];
            }
        }
        close(&to_f64(&opt.params()[0].tensor), &w);
        // Bias: excluded, so plain momentum with no decay and trust 1.
        let mut b = W[..3].to_vec();
        let mut vb = [0.0; 3];
        for _ in 0..2 {
            for k in 0..3 {
                vb[k] = m * vb[k] + lr * G[k];
                b[k] -= vb[k];
            }
        }
        close(&to_f64(&opt.params()[1].tensor), &b);
    }

    #[test]
    fn lars_trust_falls_back_to_one_for_zero_norms() {
        let w = Tensor::zeros([2, 2], (Kind::Double, Device::Cpu)).set_requires_grad(true);
        (&w * Tensor::from_slice(&[1.0, 2.0, 3.0, 4.0]).view([2, 2])).sum(Kind::Double).backward();
        let mut opt = Optimizer::new(Algorithm::simclr_lars(), vec![Param::new("w", w)]);
        opt.step(0.5);
        close(&to_f64(&opt.params()[0].tensor), &[-0.5, -1.0, -1.5, -2.0]);
    }

    #[test]
    fn sgd_momentum_and_nesterov_follow_pytorch() {
        for nesterov in [false, true] {
            let (lr, m, wd) = (0.1, 0.9, 1e-3);
            let mut opt = Optimizer::new(Algorithm::Sgd { momentum: m, nesterov, weight_decay: wd }, params());
            opt.step(lr);
            regrad(&mut opt);
            opt.step(lr);
            let mut w = W.to_vec();
            let mut buf: Option<Vec<f64>> = None;
            for _ in 0..2 {
                let d: Vec<f64> = G.iter().zip(&w).map(|(g, w)| g + wd * w).collect();
                let b: Vec<f64> = match &buf {
                    Some(b) => b.iter().zip(&d).map(|(b, d)| m * b + d).collect(),
                    None => d.clone(),
                };
                for k in 0..6 {
                    let step = if nesterov { d[k] + m * b[k] } else { b[k] };
                    w[k] -= lr * step;
                }
                buf = Some(b);
            }
            close(&to_f64(&opt.params()[0].tensor), &w);
        }
    }

    #[test]
    fn adamw_follows_pytorch() {
        let (lr, b1, b2, eps, wd) = (0.01, 0.9, 0.999, 1e-8, 0.05);
        let mut opt = Optimizer::new(Algorithm::AdamW { beta1: b1, beta2: b2, eps, weight_decay: wd }, params());
        opt.step(lr);
        regrad(&mut opt);
        opt.step(lr);
        let mut w = W.to_vec();
        let (mut m, mut v) = (vec![0.0; 6], vec![0.0; 6]);
        for t in 1..=2 {
            for k in 0..6 {
                w[k] *= 1.0 - lr * wd;
                m[k] = b1 * m[k] + (1.0 - b1) * G[k];
                v[k] = b2 * v[k] + (1.0 - b2) * G[k] * G[k];
                let m_hat = m[k] / (1.0 - f64::powi(b1, t));
                let v_hat = v[k] / (1.0 - f64::powi(b2, t));
                w[k] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
        }
        close(&to_f64(&opt.params()[0].tensor), &w);
    }

    #[test]
    fn state_round_trips_and_resumes_identically() {
        let mut a =
            Optimizer::new(Algorithm::AdamW { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 }, params());
        a.step(0.01);
        // A second optimiser over copies of the parameters, given a's state.
        let copies: Vec<Param> = a
            .params()
            .iter()
            .map(|p| Param::new(p.name.clone(), p.tensor.detach().copy().set_requires_grad(true)))
            .collect();
        let mut b = Optimizer::new(Algorithm::AdamW { beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1 }, copies);
        b.load_state(&a.state()).unwrap();
        assert_eq!(b.steps(), 1);
        regrad(&mut a);
        regrad(&mut b);
        a.step(0.01);
        b.step(0.01);
        close(&to_f64(&a.params()[0].tensor), &to_f64(&b.params()[0].tensor));
        let bad = vec![("layer.weight.first".to_string(), Tensor::zeros([3], (Kind::Double, Device::Cpu)))];
        assert!(b.load_state(&bad).unwrap_err().contains("shape"));
    }

    #[test]
    fn learning_rate_scaling_and_schedule() {
        assert!((scaled_lr(0.3, 4096, LrScaling::Linear) - 4.8).abs() < 1e-12);
        assert!((scaled_lr(0.075, 4096, LrScaling::Sqrt) - 4.8).abs() < 1e-12);
        let (peak, warmup, total) = (2.0, 10, 110);
        assert_eq!(warmup_cosine(peak, 0, warmup, total), 0.0);
        assert!((warmup_cosine(peak, 5, warmup, total) - 1.0).abs() < 1e-12);
        assert!((warmup_cosine(peak, 10, warmup, total) - 2.0).abs() < 1e-12);
        assert!((warmup_cosine(peak, 60, warmup, total) - 1.0).abs() < 1e-12);
        assert!(warmup_cosine(peak, 110, warmup, total).abs() < 1e-12);
        assert!(warmup_cosine(peak, 500, warmup, total).abs() < 1e-12);
    }
}
