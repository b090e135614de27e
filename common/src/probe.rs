//! The `[probe]` section: the grid of classifier probes swept over the frozen encoder, and its
//! expansion into tasks (configuration x encoder x seed). Pure data, so the coordinator expands and
//! validates it and the workers read the same types.
//!
//! The default grid is Skluzacek's (2022) Table 3.2 fully crossed (hidden units {100, 500} x
//! dropout {none, 20%} x epochs {20, 25, 30}, sigmoid output, binary cross-entropy, SGD) plus a linear
//! probe (the SimCLR paper's protocol), each repeated over 3 seeds, through the pretrained encoder and
//! through a randomly initialised one (the baseline).
//!
//! Skluzacek (2022): T. Skluzacek, *An Analysis of Transfer Learning using the SimCLR Contrastive Learning
//! Framework*, University of Minnesota capstone report, 2022.

use serde::{Deserialize, Serialize};

use crate::config::{invalid, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ProbeOptimizerName {
    #[default]
    Sgd,
    Adam,
    Lars,
}

/// Which frozen encoder a probe reads features from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderSource {
    /// The encoder pretraining produced (or `probe.encoder`).
    Simclr,
    /// The same architecture, randomly initialised from the job's seed: the baseline.
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSection {
    pub enabled: bool,
    /// Encoder weights (torchvision-format safetensors) to probe instead of the run's own
    /// `encoder.safetensors`; unset: the run's.
    pub encoder: Option<std::path::PathBuf>,
    pub hidden: Vec<i64>,
    /// Dropout before and after the hidden layer; 0 is none.
    pub dropout: Vec<f64>,
    pub epochs: Vec<usize>,
    /// Also a linear probe (no hidden layer, no dropout) for each entry of `epochs`.
    pub linear: bool,
    pub seeds: usize,
    pub optimizer: ProbeOptimizerName,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub batch_size: usize,
    /// Resamples of the test metrics' 95% bootstrap intervals (0: none).
    pub bootstrap: usize,
    /// Also probe a randomly initialised encoder, in the same run, through the same probes.
    pub random_baseline: bool,
    /// Share of the training side's patients (studies where no PatientID) whose labels the probes (and
    /// fine-tuning) train on, chosen by `data.split_seed`: SimCLR's label-efficiency setting (its paper's
    /// 1% and 10%). Pretraining still sees every training image; validation and test are whole.
    pub label_fraction: f64,
    /// Also fine-tune: every configuration once more with the encoder trained together with the probe
    /// (BatchNorm statistics frozen). Fine-tuning the random encoder is a supervised encoder trained
    /// from scratch on the training split.
    pub finetune: bool,
    /// The encoder's last residual stages that fine-tuning trains (1-4); 0: the whole encoder.
    pub finetune_blocks: usize,
    /// The encoder's learning rate while fine-tuning, as a multiple of `lr` (the probe's).
    pub finetune_lr_scale: f64,
}

impl Default for ProbeSection {
    fn default() -> Self {
        ProbeSection {
            enabled: true,
            encoder: None,
            hidden: vec![100, 500],
            dropout: vec![0.0, 0.2],
            epochs: vec![20, 25, 30],
            linear: true,
            seeds: 3,
            optimizer: ProbeOptimizerName::Sgd,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            batch_size: 64,
            bootstrap: 1000,
            random_baseline: true,
            label_fraction: 1.0,
            finetune: false,
            finetune_blocks: 0,
            finetune_lr_scale: 0.1,
        }
    }
}

/// One probe to train: an entry of the grid, an encoder and a seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeTask {
    /// Position in the expansion (stable for a given section).
    pub id: usize,
    pub encoder: EncoderSource,
    /// 0: a linear probe.
    pub hidden: i64,
    pub dropout: f64,
    pub epochs: usize,
    pub seed: u64,
    /// The encoder is trained with the probe (see `ProbeSection::finetune`).
    #[serde(default)]
    pub finetune: bool,
}

impl ProbeTask {
    /// The configuration without the seed and encoder: the row of the results table.
    pub fn configuration(&self) -> String {
        let probe = if self.hidden == 0 {
            format!("linear, {} epochs", self.epochs)
        } else if self.dropout == 0.0 {
            format!("{} hidden, no dropout, {} epochs", self.hidden, self.epochs)
        } else {
            format!("{} hidden, dropout {}, {} epochs", self.hidden, self.dropout, self.epochs)
        };
        if self.finetune {
            format!("{probe}, fine-tuned")
        } else {
            probe
        }
    }
}

/// One epoch of a probe's training, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochPoint {
    pub epoch: usize,
    pub train_loss: f64,
    pub train_accuracy: f64,
    pub test_loss: f64,
    pub test_accuracy: f64,
}

/// A probe's metrics on one split (test, or validation without intervals) for one label column.
/// Image level: every image scored on its own; study level: a study's score is the mean of its images'
/// (the Kaggle task is a study-level one). Intervals are 95% percentile bootstraps that resample
/// patients (studies where the PatientID is unknown). Undefined values (one class only) are None.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClassOutcome {
    pub column: String,
    pub accuracy: f64,
    pub auc: Option<f64>,
    pub average_precision: Option<f64>,
    pub accuracy_ci: Option<(f64, f64)>,
    pub auc_ci: Option<(f64, f64)>,
    pub average_precision_ci: Option<(f64, f64)>,
    /// The test ROC curve: (false positive rate, true positive rate) from (0, 0) to (1, 1); empty
    /// when undefined.
    #[serde(default)]
    pub roc: Vec<(f64, f64)>,
    #[serde(default)]
    pub study_auc: Option<f64>,
    #[serde(default)]
    pub study_average_precision: Option<f64>,
    #[serde(default)]
    pub study_auc_ci: Option<(f64, f64)>,
    #[serde(default)]
    pub study_average_precision_ci: Option<(f64, f64)>,
}

/// What a worker reports for a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProbeOutcome {
    pub task: ProbeTask,
    pub rank: u32,
    pub seconds: f64,
    pub curves: Vec<EpochPoint>,
    /// Test metrics per label column.
    pub classes: Vec<ClassOutcome>,
    /// Validation metrics per label column (no intervals): what configurations are chosen on. Empty
    /// without a validation side (`data.validation_fraction = 0`).
    #[serde(default)]
    pub validation: Vec<ClassOutcome>,
    /// Why the task failed (a probe that diverged, say): a failed row, with no curves or classes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl ProbeOutcome {
    /// The row of a task that failed on `rank` after `seconds`, for `reason`.
    pub fn failed(task: ProbeTask, rank: u32, seconds: f64, reason: String) -> ProbeOutcome {
        ProbeOutcome {
            task,
            rank,
            seconds,
            curves: Vec::new(),
            classes: Vec::new(),
            validation: Vec::new(),
            error: Some(reason),
        }
    }

    /// The last epoch's point.
    pub fn last(&self) -> Option<&EpochPoint> {
        self.curves.last()
    }

    /// The mean over label columns of a metric, None if any column lacks it.
    /// The mean over label columns of a validation metric (None without validation metrics).
    pub fn validation_mean(&self, metric: impl Fn(&ClassOutcome) -> Option<f64>) -> Option<f64> {
        mean_over(&self.validation, metric)
    }

    pub fn mean_over_classes(&self, metric: impl Fn(&ClassOutcome) -> Option<f64>) -> Option<f64> {
        mean_over(&self.classes, metric)
    }
}

/// The mean of `metric` over label columns; None when a column lacks it or there are none.
fn mean_over(classes: &[ClassOutcome], metric: impl Fn(&ClassOutcome) -> Option<f64>) -> Option<f64> {
    let values: Option<Vec<f64>> = classes.iter().map(metric).collect();
    values.filter(|v| !v.is_empty()).map(|v| v.iter().sum::<f64>() / v.len() as f64)
}

impl ProbeSection {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.hidden.is_empty() && !self.linear {
            return Err(invalid("probe.hidden", "[]", "expected at least one size, or probe.linear = true".into()));
        }
        if let Some(h) = self.hidden.iter().find(|&&h| h <= 0) {
            return Err(invalid("probe.hidden", h, "expected positive numbers of units".into()));
        }
        if self.dropout.is_empty() {
            return Err(invalid("probe.dropout", "[]", "expected at least one rate, e.g. [0.0]".into()));
        }
        if let Some(p) = self.dropout.iter().find(|p| !(0.0..1.0).contains(*p)) {
            return Err(invalid("probe.dropout", p, "expected rates in [0, 1)".into()));
        }
        if self.epochs.is_empty() || self.epochs.contains(&0) {
            return Err(invalid("probe.epochs", format!("{:?}", self.epochs), "expected positive epoch counts".into()));
        }
        if self.seeds == 0 {
            return Err(invalid("probe.seeds", self.seeds, "expected at least 1".into()));
        }
        if !(self.label_fraction > 0.0 && self.label_fraction <= 1.0) {
            return Err(invalid("probe.label_fraction", self.label_fraction, "expected a share in (0, 1]".into()));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(invalid("probe.lr", self.lr, "expected a positive learning rate".into()));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return Err(invalid("probe.momentum", self.momentum, "expected [0, 1)".into()));
        }
        if self.weight_decay < 0.0 {
            return Err(invalid("probe.weight_decay", self.weight_decay, "expected >= 0".into()));
        }
        if self.batch_size == 0 {
            return Err(invalid("probe.batch_size", self.batch_size, "expected at least 1".into()));
        }
        if self.finetune_blocks > 4 {
            return Err(invalid(
                "probe.finetune_blocks",
                self.finetune_blocks,
                "expected 0 (the whole encoder) to 4 (residual stages)".into(),
            ));
        }
        if !(self.finetune_lr_scale > 0.0 && self.finetune_lr_scale.is_finite()) {
            return Err(invalid(
                "probe.finetune_lr_scale",
                self.finetune_lr_scale,
                "expected a positive factor".into(),
            ));
        }
        Ok(())
    }

    /// Every task of the sweep: for each encoder (pretrained, then the random baseline), the linear
    /// probes, then the grid (hidden x dropout x epochs), each over the seeds `job_seed..job_seed+seeds`;
    /// with `finetune`, then all of them again fine-tuned.
    pub fn expand(&self, job_seed: u64) -> Vec<ProbeTask> {
        let mut configurations: Vec<(i64, f64, usize)> = Vec::new();
        if self.linear {
            configurations.extend(self.epochs.iter().map(|&e| (0, 0.0, e)));
        }
        for &h in &self.hidden {
            for &d in &self.dropout {
                for &e in &self.epochs {
                    configurations.push((h, d, e));
                }
            }
        }
        let encoders: &[EncoderSource] = if self.random_baseline {
            &[EncoderSource::Simclr, EncoderSource::Random]
        } else {
            &[EncoderSource::Simclr]
        };
        let modes: &[bool] = if self.finetune { &[false, true] } else { &[false] };
        let mut tasks = Vec::new();
        for &finetune in modes {
            for &encoder in encoders {
                for &(hidden, dropout, epochs) in &configurations {
                    for s in 0..self.seeds as u64 {
                        let id = tasks.len();
                        let seed = job_seed.wrapping_add(s);
                        tasks.push(ProbeTask { id, encoder, hidden, dropout, epochs, seed, finetune });
                    }
                }
            }
        }
        tasks
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_grid_is_the_reports_table_plus_a_linear_probe() {
        let tasks = ProbeSection::default().expand(7);
        // (3 linear + 2 x 2 x 3 MLP) configurations x 3 seeds x 2 encoders
        assert_eq!(tasks.len(), (3 + 12) * 3 * 2);
        assert!(tasks.iter().enumerate().all(|(i, t)| t.id == i));
        let mlp: std::collections::BTreeSet<(i64, u64, usize)> = tasks
            .iter()
            .filter(|t| t.encoder == EncoderSource::Simclr && t.hidden > 0)
            .map(|t| (t.hidden, (t.dropout * 100.0) as u64, t.epochs))
            .collect();
        assert_eq!(mlp.len(), 12);
        assert!(mlp.contains(&(500, 20, 25)));
        let seeds: std::collections::BTreeSet<u64> = tasks.iter().map(|t| t.seed).collect();
        assert_eq!(seeds, [7, 8, 9].into());
        assert_eq!(tasks.iter().filter(|t| t.encoder == EncoderSource::Random).count(), 45);
        assert_eq!(tasks[0].configuration(), "linear, 20 epochs");
        let no_baseline = ProbeSection { random_baseline: false, linear: false, seeds: 1, ..ProbeSection::default() };
        assert_eq!(no_baseline.expand(0).len(), 12);
        // Fine-tuning repeats every task with the encoder trained.
        let tuned = ProbeSection { finetune: true, ..ProbeSection::default() }.expand(7);
        assert_eq!(tuned.len(), 180);
        assert!(tuned[..90].iter().all(|t| !t.finetune) && tuned[90..].iter().all(|t| t.finetune));
        assert_eq!(tuned[90].configuration(), "linear, 20 epochs, fine-tuned");
    }

    #[test]
    fn the_section_reads_from_toml_and_rejects_unknown_keys() {
        let config =
            crate::JobConfig::from_toml("[probe]\nhidden = [64]\nseeds = 2\noptimizer = \"adam\"\n", "t").unwrap();
        assert_eq!((config.probe.hidden.clone(), config.probe.seeds), (vec![64], 2));
        assert_eq!(config.probe.optimizer, ProbeOptimizerName::Adam);
        let again = crate::JobConfig::from_toml(&config.to_toml(), "effective").unwrap();
        assert_eq!(again.probe, config.probe);
        let e = crate::JobConfig::from_toml("[probe]\nhiden = [64]\n", "t").unwrap_err().to_string();
        assert!(e.contains("hiden"), "{e}");
        let e = crate::JobConfig::from_toml("[probe]\nseeds = 0\n", "t").unwrap_err().to_string();
        assert!(e.contains("probe.seeds"), "{e}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let bad = [
            (ProbeSection { hidden: vec![0], ..ProbeSection::default() }, "probe.hidden"),
            (ProbeSection { dropout: vec![1.0], ..ProbeSection::default() }, "probe.dropout"),
            (ProbeSection { epochs: vec![], ..ProbeSection::default() }, "probe.epochs"),
            (ProbeSection { seeds: 0, ..ProbeSection::default() }, "probe.seeds"),
            (ProbeSection { lr: -1.0, ..ProbeSection::default() }, "probe.lr"),
            (ProbeSection { batch_size: 0, ..ProbeSection::default() }, "probe.batch_size"),
            (ProbeSection { hidden: vec![], linear: false, ..ProbeSection::default() }, "probe.hidden"),
            (ProbeSection { finetune_blocks: 5, ..ProbeSection::default() }, "probe.finetune_blocks"),
            (ProbeSection { finetune_lr_scale: 0.0, ..ProbeSection::default() }, "probe.finetune_lr_scale"),
        ];
        for (section, key) in bad {
            let e = section.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        ProbeSection::default().validate().unwrap();
    }
}
