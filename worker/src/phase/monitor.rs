//! `[pretrain.monitor]` on one worker: every few epochs of pretraining, the encoder's frozen features
//! of the labelled training and validation images (this rank's share, gathered from every rank and
//! ordered by image index, so the result is the same for any world size), and a weighted kNN
//! classifier ([`crate::probe::knn`]) of the validation images against the training images for the
//! first target. The images are read from the decode cache once, before the first step.
//!
//! Beside the step, an online linear classifier (solo-learn's online evaluation) learns the first
//! target from the step's own features (first view, detached): every rank's features of the global
//! batch are gathered in rank order (the global batch's order, the same for any world size),
//! standardised by running statistics and fed to one linear layer trained by SGD with momentum on
//! binary cross-entropy. Each look also scores the validation images with it. It starts afresh when a
//! run resumes (it is not part of the checkpoint).

use simclr_common::pretrain::MonitorConfig;
use simclr_data::pixels::DecodeOptions;
use simclr_proto::wire;
use tch::nn::{self, Module, OptimizerConfig};
use tch::{Device, Kind, Tensor};

use crate::comm::Collective;
use crate::engine::model::Encoder;
use crate::phase::probe::{labelled_images, sorted_rows};
use crate::probe::features::gather_rows;
use crate::probe::knn::knn_scores;
use crate::probe::{embed, EMBED_BATCH};

/// One look at the encoder.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct MonitorPoint {
    pub epoch: u64,
    pub step: u64,
    pub knn_auc: f64,
    pub knn_accuracy: f64,
    /// The online linear classifier on the validation images.
    pub online_auc: f64,
    pub online_accuracy: f64,
}

/// The online linear classifier's learning rate and momentum (SGD), and the running statistics'
/// momentum (as BatchNorm's).
const ONLINE_LR: f64 = 0.1;
const ONLINE_MOMENTUM: f64 = 0.9;
const STATS_MOMENTUM: f64 = 0.1;

/// Standardisation by running statistics, then one linear layer to one logit.
struct OnlineLinear {
    _vs: nn::VarStore,
    linear: nn::Linear,
    optimizer: nn::Optimizer,
    mean: Tensor,
    var: Tensor,
    steps: u64,
}

impl OnlineLinear {
    fn new(dim: i64) -> Result<OnlineLinear, String> {
        let vs = nn::VarStore::new(Device::Cpu);
        let linear = crate::engine::model::with_torch_seed(0, || {
            nn::linear(
                vs.root() / "online",
                dim,
                1,
                nn::LinearConfig { ws_init: nn::Init::Const(0.0), ..Default::default() },
            )
        });
        let optimizer = nn::Sgd { momentum: ONLINE_MOMENTUM, ..Default::default() }
            .build(&vs, ONLINE_LR)
            .map_err(|e| e.to_string())?;
        let zeros = Tensor::zeros([dim], (Kind::Float, Device::Cpu));
        Ok(OnlineLinear { _vs: vs, linear, optimizer, mean: zeros.copy(), var: zeros + 1.0, steps: 0 })
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        self.linear.forward(&((x - &self.mean) / (&self.var + 1e-5).sqrt())).squeeze_dim(1)
    }

    /// One SGD step on the labelled rows of `x` (N x D) with labels `y` (N; NaN: unlabelled).
    fn train(&mut self, x: &Tensor, y: &Tensor) {
        let keep = y.isfinite().nonzero().squeeze_dim(1);
        if keep.size()[0] < 2 {
            return;
        }
        let (x, y) = (x.index_select(0, &keep), y.index_select(0, &keep));
        tch::no_grad(|| {
            let (mean, var) = (x.mean_dim(0, false, Kind::Float), x.var_dim(0, false, false));
            if self.steps == 0 {
                self.mean = mean;
                self.var = var;
            } else {
                self.mean = &self.mean * (1.0 - STATS_MOMENTUM) + mean * STATS_MOMENTUM;
                self.var = &self.var * (1.0 - STATS_MOMENTUM) + var * STATS_MOMENTUM;
            }
        });
        let loss = self.logits(&x).binary_cross_entropy_with_logits::<Tensor>(&y, None, None, tch::Reduction::Mean);
        self.optimizer.backward_step(&loss);
        self.steps += 1;
    }

    fn scores(&self, x: &Tensor) -> Tensor {
        tch::no_grad(|| self.logits(x).sigmoid())
    }
}

struct Labelled {
    /// This rank's images (N x 1 x S x S), first-target labels (N x 1) and row keys (N x 12).
    x: Tensor,
    y: Tensor,
    keys: Tensor,
}

pub struct Monitor {
    config: MonitorConfig,
    train: Labelled,
    validation: Labelled,
    input_size: i64,
    device: Device,
    online: Option<OnlineLinear>,
    pub history: Vec<MonitorPoint>,
}

impl Monitor {
    /// Reads this rank's labelled images (`assignment`: the probe phase's). None when the monitor is
    /// off, the job has no labels, or either split is empty on every rank (decided from gathered
    /// counts, so every rank agrees). Images that do not decode are left out here; the probe phase
    /// reports them.
    pub fn load(
        config: MonitorConfig,
        assignment: &wire::GetAssignmentResponse,
        decode: DecodeOptions,
        input_size: i64,
        device: Device,
        collective: &dyn Collective,
    ) -> Result<Option<Monitor>, String> {
        if config.every_epochs == 0 {
            return Ok(None);
        }
        let read = |refs: &[wire::ImageRef]| -> Result<Labelled, String> {
            let (x, y, keys, _) = labelled_images(assignment, decode, refs)?;
            let y = if y.size()[1] > 0 { y.narrow(1, 0, 1) } else { y };
            Ok(Labelled { x, y, keys })
        };
        let columns = assignment.label_columns.len() as f32;
        let train = read(&assignment.train)?;
        let validation = read(&assignment.validation)?;
        let counts = Tensor::from_slice(&[train.x.size()[0] as f32, validation.x.size()[0] as f32, columns]);
        let counts = Vec::<f32>::try_from(collective.all_gather(&counts).map_err(|e| e.to_string())?.flatten(0, -1))
            .map_err(|e| e.to_string())?;
        let total = |i: usize| counts.chunks(3).map(|c| c[i]).sum::<f32>();
        if total(2) == 0.0 || total(0) < 2.0 || total(1) < 1.0 {
            tracing::info!("pretrain.monitor: no labelled training and validation images; no kNN monitor");
            return Ok(None);
        }
        Ok(Some(Monitor { config, train, validation, input_size, device, online: None, history: Vec::new() }))
    }

    /// One step of the online classifier on this step's features of this rank's samples (`features`,
    /// n x D) with their first-target labels (n; NaN where a study has none). Collective: every rank
    /// calls it after every step.
    pub fn step_online(
        &mut self,
        features: &Tensor,
        labels: &[f32],
        collective: &dyn Collective,
    ) -> Result<(), String> {
        let n = features.size()[0];
        if labels.len() as i64 != n {
            return Err(format!("{n} feature rows for {} labels", labels.len()));
        }
        let x = gather_rows(collective, &features.to_device(Device::Cpu).to_kind(Kind::Float))?;
        let y = gather_rows(collective, &Tensor::from_slice(labels).view([n, 1]))?.flatten(0, -1);
        if self.online.is_none() {
            self.online = Some(OnlineLinear::new(x.size()[1])?);
        }
        if let Some(online) = self.online.as_mut() {
            online.train(&x, &y);
        }
        Ok(())
    }

    /// Whether the epoch just completed (0-based) is one to look at; the last one always is.
    pub fn due(&self, epoch: u64, last: bool) -> bool {
        last || (epoch + 1).is_multiple_of(self.config.every_epochs)
    }

    /// The kNN classifier's validation AUC and accuracy (threshold 0.5) on `encoder`'s features now.
    /// Collective: every rank calls it at the same point.
    pub fn look(
        &mut self,
        encoder: &Encoder,
        collective: &dyn Collective,
        epoch: u64,
        step: u64,
    ) -> Result<MonitorPoint, String> {
        let mut gathered = Vec::new();
        for split in [&self.train, &self.validation] {
            let x = if split.x.size()[2] == self.input_size {
                split.x.shallow_clone()
            } else {
                split.x.upsample_bilinear2d([self.input_size, self.input_size], false, None, None)
            };
            let features = embed(encoder, &x, EMBED_BATCH, self.device);
            let features = gather_rows(collective, &features)?;
            let y = gather_rows(collective, &split.y.to_kind(Kind::Float))?;
            let keys = gather_rows(collective, &split.keys)?;
            let (order, _, _) = sorted_rows(&keys)?;
            gathered.push((features.index_select(0, &order), y.index_select(0, &order)));
        }
        let [(train_f, train_y), (val_f, val_y)] = <[_; 2]>::try_from(gathered).map_err(|_| "two splits")?;
        let scores =
            knn_scores(&train_f, &train_y.flatten(0, -1), &val_f, self.config.knn_k, self.config.knn_temperature);
        let scores = Vec::<f64>::try_from(scores.to_kind(Kind::Double)).map_err(|e| e.to_string())?;
        let labels: Vec<bool> =
            Vec::<f32>::try_from(val_y.flatten(0, -1)).map_err(|e| e.to_string())?.iter().map(|&v| v >= 0.5).collect();
        let (online_auc, online_accuracy) = match &self.online {
            Some(online) if online.steps > 0 => {
                let online =
                    Vec::<f64>::try_from(online.scores(&val_f).to_kind(Kind::Double)).map_err(|e| e.to_string())?;
                (
                    simclr_common::metrics::roc_auc(&online, &labels).unwrap_or(f64::NAN),
                    simclr_common::metrics::accuracy(&online, &labels, 0.5),
                )
            }
            _ => (f64::NAN, f64::NAN),
        };
        let point = MonitorPoint {
            epoch,
            step,
            knn_auc: simclr_common::metrics::roc_auc(&scores, &labels).unwrap_or(f64::NAN),
            knn_accuracy: simclr_common::metrics::accuracy(&scores, &labels, 0.5),
            online_auc,
            online_accuracy,
        };
        self.history.retain(|p| p.epoch != epoch);
        self.history.push(point);
        Ok(point)
    }

    /// With the looks `path` (an earlier attempt's `monitor.csv`) recorded for epochs before `epoch`.
    pub fn resumed(mut self, path: &std::path::Path, epoch: u64) -> Monitor {
        let Ok(text) = std::fs::read_to_string(path) else { return self };
        for line in text.lines().skip(1) {
            let v: Vec<&str> = line.split(',').collect();
            if let [e, s, rest @ ..] = v.as_slice() {
                let value = |i: usize| rest.get(i).and_then(|x| x.parse::<f64>().ok()).unwrap_or(f64::NAN);
                if let (Ok(e), Ok(step)) = (e.parse::<u64>(), s.parse()) {
                    if e >= 1 && e - 1 < epoch {
                        self.history.push(MonitorPoint {
                            epoch: e - 1,
                            step,
                            knn_auc: value(0),
                            knn_accuracy: value(1),
                            online_auc: value(2),
                            online_accuracy: value(3),
                        });
                    }
                }
            }
        }
        self
    }

    /// `monitor.csv`: one row per look (epoch counted from 1), rewritten whole each time.
    pub fn write_csv(&self, path: &std::path::Path) -> std::io::Result<()> {
        let mut text = String::from("epoch,step,knn_auc,knn_accuracy,online_auc,online_accuracy\n");
        for p in &self.history {
            text.push_str(&format!(
                "{},{},{:.6},{:.6},{:.6},{:.6}\n",
                p.epoch + 1,
                p.step,
                p.knn_auc,
                p.knn_accuracy,
                p.online_auc,
                p.online_accuracy
            ));
        }
        simclr_common::atomic_file::write_atomic(path, |tmp| std::fs::write(tmp, &text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_online_classifier_learns_a_separable_label_and_skips_unlabelled_rows() {
        // Label = 1 where the first feature exceeds its mean; features on a scale of 100 (standardised
        // before the linear layer, so the scale does not matter). Unlabelled rows (NaN) carry the
        // opposite pattern and must be ignored.
        let x = crate::engine::model::with_torch_seed(3, || Tensor::randn([64, 8], (Kind::Float, Device::Cpu))) * 100.0;
        let y = x.select(1, 0).gt(0.0).to_kind(Kind::Float);
        let _ = y.narrow(0, 0, 8).fill_(f64::NAN);
        let mut online = OnlineLinear::new(8).unwrap();
        for _ in 0..60 {
            online.train(&x, &y);
        }
        let scores = Vec::<f64>::try_from(online.scores(&x.narrow(0, 8, 56)).to_kind(Kind::Double)).unwrap();
        let labels: Vec<bool> = Vec::<f32>::try_from(y.narrow(0, 8, 56)).unwrap().iter().map(|&v| v >= 0.5).collect();
        assert!(simclr_common::metrics::accuracy(&scores, &labels, 0.5) >= 0.95, "{scores:?}");
        assert_eq!(online.steps, 60);
        // Too few labelled rows: no step.
        let mut idle = OnlineLinear::new(8).unwrap();
        idle.train(&x.narrow(0, 0, 8), &y.narrow(0, 0, 8));
        assert_eq!(idle.steps, 0);
    }
}
