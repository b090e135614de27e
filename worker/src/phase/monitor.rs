//! `[pretrain.monitor]` on one worker: every few epochs of pretraining, the encoder's frozen features
//! of the labelled training and validation images (this rank's share, gathered from every rank and
//! ordered by image index, so the result is the same for any world size), and a weighted kNN
//! classifier ([`crate::probe::knn`]) of the validation images against the training images for the
//! first target. The images are read from the decode cache once, before the first step.

use simclr_common::pretrain::MonitorConfig;
use simclr_data::pixels::DecodeOptions;
use simclr_proto::wire;
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
        Ok(Some(Monitor { config, train, validation, input_size, device, history: Vec::new() }))
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
        let point = MonitorPoint {
            epoch,
            step,
            knn_auc: simclr_common::metrics::roc_auc(&scores, &labels).unwrap_or(f64::NAN),
            knn_accuracy: simclr_common::metrics::accuracy(&scores, &labels, 0.5),
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
            if let [e, s, auc, acc] = v.as_slice() {
                if let (Ok(e), Ok(step), Ok(knn_auc), Ok(knn_accuracy)) =
                    (e.parse::<u64>(), s.parse(), auc.parse(), acc.parse())
                {
                    if e >= 1 && e - 1 < epoch {
                        self.history.push(MonitorPoint { epoch: e - 1, step, knn_auc, knn_accuracy });
                    }
                }
            }
        }
        self
    }

    /// `monitor.csv`: one row per look (epoch counted from 1), rewritten whole each time.
    pub fn write_csv(&self, path: &std::path::Path) -> std::io::Result<()> {
        let mut text = String::from("epoch,step,knn_auc,knn_accuracy\n");
        for p in &self.history {
            text.push_str(&format!("{},{},{:.6},{:.6}\n", p.epoch + 1, p.step, p.knn_auc, p.knn_accuracy));
        }
        simclr_common::atomic_file::write_atomic(path, |tmp| std::fs::write(tmp, &text))
    }
}
