//! Classifier probes on frozen features: Skluzacek's (2022) MLP (dropout, a hidden ReLU layer,
//! dropout, a sigmoid output per class, binary cross-entropy, SGD) or, with `hidden = 0`, a linear
//! probe (the SimCLR paper's protocol). A probe trains on cached features, so one configuration costs
//! seconds, not an encoder pass per epoch.
//!
//! Features are standardised with the training split's per-dimension mean and deviation (the test
//! split never informs them). Everything random (initial weights, dropout masks, the epoch order) comes
//! from the configuration's seed, so a configuration and seed give the same result on any worker.
//!
//! Skluzacek (2022): T. Skluzacek, *An Analysis of Transfer Learning using the SimCLR Contrastive Learning
//! Framework*, University of Minnesota capstone report, 2022.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use simclr_common::metrics;
use simclr_common::probe::{
    ClassOutcome, EncoderSource, EpochPoint, ProbeOptimizerName, ProbeOutcome, ProbeSection, ProbeTask,
};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

use crate::engine::model::{var_store_drawn_on_cpu, with_torch_seed};
use crate::engine::optim::{Algorithm, Optimizer, Param};

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ProbeOptimizer {
    Sgd { momentum: f64 },
    Adam,
    Lars,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeConfig {
    /// Units of the hidden layer; 0: a linear probe.
    pub hidden: i64,
    /// Dropout before and after the hidden layer (0: none).
    pub dropout: f64,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub weight_decay: f64,
    pub optimizer: ProbeOptimizer,
    pub seed: u64,
    /// Bootstrap resamples for the test metrics' 95% intervals (0: none).
    pub bootstrap: usize,
}

impl Default for ProbeConfig {
    fn default() -> Self {
        ProbeConfig {
            hidden: 100,
            dropout: 0.0,
            epochs: 20,
            batch_size: 64,
            lr: 0.01,
            weight_decay: 0.0,
            optimizer: ProbeOptimizer::Sgd { momentum: 0.9 },
            seed: 0,
            bootstrap: 1000,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeResult {
    pub curves: Vec<EpochPoint>,
    /// Per class, in label column order (their `column` left empty: the caller knows the names).
    pub classes: Vec<ClassOutcome>,
    /// Test scores (sigmoid outputs), N_test x classes, row-major.
    pub test_scores: Vec<f64>,
    /// Validation scores, N_validation x classes, row-major (empty without a validation split).
    pub validation_scores: Vec<f64>,
}

impl ProbeResult {
    pub fn last(&self) -> EpochPoint {
        *self.curves.last().expect("a probe trains at least one epoch")
    }
}

struct Mlp {
    hidden: Option<nn::Linear>,
    out: nn::Linear,
    dropout: f64,
}

impl Mlp {
    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        match &self.hidden {
            None => self.out.forward(x),
            Some(hidden) => {
                let x = x.dropout(self.dropout, train);
                let x = hidden.forward(&x).relu();
                self.out.forward(&x.dropout(self.dropout, train))
            }
        }
    }
}

/// Trains a probe on `train` features (N x d) and 0/1 labels (N x classes), and evaluates it on `test`.
pub fn train_probe(
    train_x: &Tensor,
    train_y: &Tensor,
    test_x: &Tensor,
    test_y: &Tensor,
    config: &ProbeConfig,
) -> Result<ProbeResult, String> {
    train_probe_validated(train_x, train_y, None, test_x, test_y, config)
}

/// [`train_probe`], also scoring a validation split (features and labels).
pub fn train_probe_validated(
    train_x: &Tensor,
    train_y: &Tensor,
    validation: Option<(&Tensor, &Tensor)>,
    test_x: &Tensor,
    test_y: &Tensor,
    config: &ProbeConfig,
) -> Result<ProbeResult, String> {
    let (n, d) = match train_x.size().as_slice() {
        &[n, d] => (n, d),
        other => return Err(format!("probe features must be N x d, got {other:?}")),
    };
    let classes = train_y.size().get(1).copied().unwrap_or(0);
    if train_y.size() != [n, classes] || classes == 0 {
        return Err(format!("probe labels must be {n} x classes, got {:?}", train_y.size()));
    }
    for (x, y) in [(test_x, test_y)].into_iter().chain(validation) {
        if x.size().get(1) != Some(&d) || y.size() != [x.size()[0], classes] {
            return Err(format!("evaluation features {:?} / labels {:?} do not match training", x.size(), y.size()));
        }
    }
    if n == 0 || config.epochs == 0 || config.batch_size == 0 {
        return Err("a probe needs training data, epochs and a batch size".into());
    }
    let (mean, std) = standardisation(train_x);
    let scale = |x: &Tensor| (x.to_kind(Kind::Float) - &mean) / &std;
    let validation_x = validation.map(|(x, _)| scale(x));
    let validation = validation_x.as_ref().zip(validation.map(|(_, y)| y));
    fit(&scale(train_x), train_y, &scale(test_x), test_y, validation, d, config, None)
}

/// Fine-tuning: the encoder trains together with the probe, on images, at `lr_scale` times the probe's
/// learning rate; the whole encoder (`stages` 0) or only its last `stages` residual stages. BatchNorm
/// trains where the encoder does (batch statistics while fitting, running statistics updated, as
/// supervised training does) and stays frozen elsewhere; evaluation uses the running statistics.
/// Dropout and the head are as for a frozen probe. The encoder's weights change: pass a copy.
pub struct FineTune<'a> {
    pub encoder: &'a crate::engine::model::Encoder,
    pub vs: &'a nn::VarStore,
    pub stages: usize,
    pub lr_scale: f64,
}

/// Trains a probe with `tune`'s encoder on `train` images (N x 1 x S x S) and 0/1 labels, evaluates
/// it on `test`. The encoder's initial features of the training images fix the standardisation.
pub fn finetune_probe(
    tune: &FineTune,
    train_images: &Tensor,
    train_y: &Tensor,
    test_images: &Tensor,
    test_y: &Tensor,
    config: &ProbeConfig,
) -> Result<ProbeResult, String> {
    finetune_probe_validated(tune, train_images, train_y, None, test_images, test_y, config)
}

/// [`finetune_probe`], also scoring a validation split (images and labels).
pub fn finetune_probe_validated(
    tune: &FineTune,
    train_images: &Tensor,
    train_y: &Tensor,
    validation: Option<(&Tensor, &Tensor)>,
    test_images: &Tensor,
    test_y: &Tensor,
    config: &ProbeConfig,
) -> Result<ProbeResult, String> {
    let device = tune.vs.device();
    let initial = embed(tune.encoder, train_images, EMBED_BATCH, device);
    let mean = initial.mean_dim([0i64].as_slice(), true, Kind::Float).to_device(device);
    let std = feature_scale(&initial).to_device(device);
    let stage_count = tune.vs.variables().keys().filter_map(|name| stage_of(name)).max().unwrap_or(0);
    let trains = |name: &str| tune.stages == 0 || stage_of(name).is_some_and(|n| n + tune.stages > stage_count);
    let mut params = Vec::new();
    let mut trained_norms = std::collections::HashSet::new();
    for (name, t) in tune.vs.variables() {
        if name.ends_with("running_mean") && trains(&name) {
            trained_norms.insert(t.data_ptr() as usize);
        }
        if !t.requires_grad() {
            continue; // BatchNorm statistics
        }
        if trains(&name) {
            params.push(Param::new(name, t));
        } else {
            let _ = t.set_requires_grad(false);
        }
    }
    if params.is_empty() {
        return Err(format!("fine-tuning the last {} stages: the encoder has no such parameters", tune.stages));
    }
    let backbone = Backbone {
        encoder: tune.encoder,
        mean,
        std,
        optimizer: Optimizer::new(algorithm(config), params),
        lr_scale: tune.lr_scale,
        trained_norms,
    };
    let d = initial.size()[1];
    fit(train_images, train_y, test_images, test_y, validation, d, config, Some(backbone))
}

/// Images per encoder forward when embedding.
pub const EMBED_BATCH: i64 = 64;

/// The residual stage (1-4) an encoder variable belongs to: `layer3.1.conv2.weight` -> 3.
fn stage_of(name: &str) -> Option<usize> {
    name.strip_prefix("layer")?.split('.').next()?.parse().ok()
}

/// An encoder trained with the probe: its output, standardised, is the probe's input.
struct Backbone<'a> {
    encoder: &'a crate::engine::model::Encoder,
    mean: Tensor,
    std: Tensor,
    optimizer: Optimizer,
    lr_scale: f64,
    /// The BatchNorm layers that train (by their running mean's storage).
    trained_norms: std::collections::HashSet<usize>,
}

/// Fine-tuning's BatchNorm: train mode in the layers being fine-tuned, eval mode in the frozen ones.
struct FineTuneNorm<'a> {
    trained: &'a std::collections::HashSet<usize>,
}

impl crate::engine::model::NormPass for FineTuneNorm<'_> {
    fn train(&self) -> bool {
        !self.trained.is_empty()
    }
    fn norm(&mut self, bn: &nn::BatchNorm, x: &Tensor) -> Tensor {
        nn::ModuleT::forward_t(bn, x, self.trained.contains(&(bn.running_mean.data_ptr() as usize)))
    }
}

impl Backbone<'_> {
    /// Standardised features of `x`; with `grad`, through the autograd graph (training), else batched
    /// without it (evaluation).
    fn features(&self, x: &Tensor, grad: bool) -> Tensor {
        let h = if grad {
            self.encoder.forward_with(x, &mut FineTuneNorm { trained: &self.trained_norms })
        } else {
            embed(self.encoder, x, EMBED_BATCH, self.mean.device())
        };
        (h.to_device(self.mean.device()) - &self.mean) / &self.std
    }
}

fn algorithm(config: &ProbeConfig) -> Algorithm {
    match config.optimizer {
        ProbeOptimizer::Sgd { momentum } => {
            Algorithm::Sgd { momentum, nesterov: false, weight_decay: config.weight_decay }
        }
        ProbeOptimizer::Adam => {
            Algorithm::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: config.weight_decay }
        }
        ProbeOptimizer::Lars => {
            Algorithm::Lars { momentum: 0.9, trust_coefficient: 0.001, weight_decay: config.weight_decay }
        }
    }
}

/// The training loop shared by frozen and fine-tuned probes: `train_x`/`test_x` are the probe's inputs
/// (standardised features of width `d`), or images when a backbone turns them into those.
#[allow(clippy::too_many_arguments)]
fn fit(
    train_x: &Tensor,
    train_y: &Tensor,
    test_x: &Tensor,
    test_y: &Tensor,
    validation: Option<(&Tensor, &Tensor)>,
    d: i64,
    config: &ProbeConfig,
    mut backbone: Option<Backbone>,
) -> Result<ProbeResult, String> {
    let n = train_x.size()[0];
    let classes = train_y.size().get(1).copied().unwrap_or(0);
    if n == 0 || classes == 0 || train_y.size()[0] != n || test_y.size() != [test_x.size()[0], classes] {
        return Err(format!(
            "a probe needs N x classes labels for its inputs: {} training inputs with labels {:?}, {} test inputs with labels {:?}",
            n,
            train_y.size(),
            test_x.size()[0],
            test_y.size()
        ));
    }
    if config.epochs == 0 || config.batch_size == 0 {
        return Err("a probe needs epochs and a batch size".into());
    }
    let device = backbone.as_ref().map_or(train_x.device(), |b| b.mean.device());
    let (train_y, test_y) =
        (train_y.to_kind(Kind::Float).to_device(device), test_y.to_kind(Kind::Float).to_device(device));
    let inputs = |backbone: &Option<Backbone>, x: &Tensor, grad: bool| match backbone {
        None => x.shallow_clone(),
        Some(b) => b.features(&x.to_device(device), grad),
    };
    with_torch_seed(config.seed, || {
        let (vs, mlp) = var_store_drawn_on_cpu(device, |root| {
            let (hidden, width) = if config.hidden > 0 {
                (Some(nn::linear(root / "hidden", d, config.hidden, Default::default())), config.hidden)
            } else {
                (None, d)
            };
            Mlp { hidden, out: nn::linear(root / "out", width, classes, Default::default()), dropout: config.dropout }
        });
        let params: Vec<Param> = vs.variables().into_iter().map(|(name, t)| Param::new(name, t)).collect();
        let mut optimizer = Optimizer::new(algorithm(config), params);
        let mut order: Vec<i64> = (0..n).collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed);
        let mut curves = Vec::with_capacity(config.epochs);
        for epoch in 0..config.epochs {
            order.shuffle(&mut rng);
            for batch in order.chunks(config.batch_size) {
                if backbone.is_some() && batch.len() < 2 {
                    continue; // BatchNorm cannot train on a single image
                }
                let index = Tensor::from_slice(batch).to_device(train_x.device());
                let x = inputs(&backbone, &train_x.index_select(0, &index), true);
                let y = train_y.index_select(0, &index.to_device(device));
                let logits = mlp.forward(&x, true);
                let loss = logits.binary_cross_entropy_with_logits::<Tensor>(&y, None, None, tch::Reduction::Mean);
                optimizer.zero_grad();
                if let Some(b) = backbone.as_mut() {
                    b.optimizer.zero_grad();
                }
                loss.backward();
                optimizer.step(config.lr);
                if let Some(b) = backbone.as_mut() {
                    b.optimizer.step(config.lr * b.lr_scale);
                }
            }
            let (train_loss, train_accuracy, _) = evaluate(&mlp, &inputs(&backbone, train_x, false), &train_y);
            let (test_loss, test_accuracy, _) = evaluate(&mlp, &inputs(&backbone, test_x, false), &test_y);
            if !train_loss.is_finite() {
                return Err(format!(
                    "the probe diverged at epoch {} (loss {train_loss}); lower its learning rate",
                    epoch + 1
                ));
            }
            curves.push(EpochPoint { epoch: epoch + 1, train_loss, train_accuracy, test_loss, test_accuracy });
        }
        let (_, _, scores) = evaluate(&mlp, &inputs(&backbone, test_x, false), &test_y);
        let scores: Vec<f64> =
            Vec::<f64>::try_from(scores.to_kind(Kind::Double).flatten(0, -1)).map_err(|e| e.to_string())?;
        let validation_scores = match validation {
            Some((x, y)) if x.size()[0] > 0 => {
                let y = y.to_kind(Kind::Float).to_device(device);
                let (_, _, v) = evaluate(&mlp, &inputs(&backbone, x, false), &y);
                Vec::<f64>::try_from(v.to_kind(Kind::Double).flatten(0, -1)).map_err(|e| e.to_string())?
            }
            _ => Vec::new(),
        };
        let labels: Vec<f64> =
            Vec::<f64>::try_from(test_y.to_kind(Kind::Double).flatten(0, -1)).map_err(|e| e.to_string())?;
        let k = classes as usize;
        let class_metrics = (0..k)
            .map(|c| {
                let s: Vec<f64> = scores.iter().skip(c).step_by(k).copied().collect();
                let y: Vec<bool> = labels.iter().skip(c).step_by(k).map(|&v| v > 0.5).collect();
                class_metrics(&s, &y, &Rows::default(), config.bootstrap, config.seed)
            })
            .collect();
        Ok(ProbeResult { curves, classes: class_metrics, test_scores: scores, validation_scores })
    })
}

type Metric = dyn Fn(&[f64], &[bool]) -> Option<f64>;

/// Which study and which bootstrap cluster (patient, else study) each row of a split belongs to. Empty:
/// every row is a study and a cluster of its own.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Rows {
    pub study: Vec<u64>,
    pub cluster: Vec<u64>,
}

impl Rows {
    fn resolve(&self, n: usize) -> (Vec<u64>, Vec<u64>) {
        if self.study.len() == n && self.cluster.len() == n {
            (self.study.clone(), self.cluster.clone())
        } else {
            ((0..n as u64).collect(), (0..n as u64).collect())
        }
    }
}

/// One label column's metrics at image and study level, with intervals from `resamples` cluster
/// bootstrap resamples (none when 0).
pub fn class_metrics(scores: &[f64], labels: &[bool], rows: &Rows, resamples: usize, seed: u64) -> ClassOutcome {
    let (studies, clusters) = rows.resolve(scores.len());
    let accuracy_of = |s: &[f64], y: &[bool]| Some(metrics::accuracy(s, y, 0.5));
    let ci = |s: &[f64], y: &[bool], c: &[u64], m: &Metric| {
        if resamples == 0 {
            None
        } else {
            metrics::cluster_bootstrap_interval(s, y, c, m, resamples, seed)
        }
    };
    let (study_scores, study_labels, study_clusters) = metrics::by_study(scores, labels, &studies, &clusters);
    ClassOutcome {
        column: String::new(),
        accuracy: metrics::accuracy(scores, labels, 0.5),
        auc: metrics::roc_auc(scores, labels),
        average_precision: metrics::average_precision(scores, labels),
        accuracy_ci: ci(scores, labels, &clusters, &accuracy_of),
        auc_ci: ci(scores, labels, &clusters, &metrics::roc_auc),
        average_precision_ci: ci(scores, labels, &clusters, &metrics::average_precision),
        roc: metrics::roc_curve(scores, labels).unwrap_or_default(),
        study_auc: metrics::roc_auc(&study_scores, &study_labels),
        study_average_precision: metrics::average_precision(&study_scores, &study_labels),
        study_auc_ci: ci(&study_scores, &study_labels, &study_clusters, &metrics::roc_auc),
        study_average_precision_ci: ci(&study_scores, &study_labels, &study_clusters, &metrics::average_precision),
    }
}

/// Mean loss, accuracy over every output, and the sigmoid scores, without dropout or gradients.
fn evaluate(mlp: &Mlp, x: &Tensor, y: &Tensor) -> (f64, f64, Tensor) {
    tch::no_grad(|| {
        if x.size()[0] == 0 {
            return (f64::NAN, f64::NAN, Tensor::zeros_like(y));
        }
        let logits = mlp.forward(x, false);
        let loss = logits.binary_cross_entropy_with_logits::<Tensor>(y, None, None, tch::Reduction::Mean);
        let scores = logits.sigmoid();
        let right = scores.ge(0.5).to_kind(Kind::Float).eq_tensor(y).to_kind(Kind::Double).mean(Kind::Double);
        (loss.double_value(&[]), right.double_value(&[]), scores)
    })
}

/// The training split's per-dimension mean and deviation, which standardise every split.
fn standardisation(train: &Tensor) -> (Tensor, Tensor) {
    let train = train.to_kind(Kind::Float);
    let mean = train.mean_dim([0i64].as_slice(), true, Kind::Float);
    (mean, feature_scale(&train))
}

/// Each feature's deviation over `train`'s rows, floored at a hundredth of the features' mean
/// deviation: a feature (nearly) constant on the training images, such as a ReLU that never fires on
/// them, may vary on the test images or come alive when the encoder is fine-tuned, and dividing it by
/// its own tiny deviation would blow it up.
fn feature_scale(train: &Tensor) -> Tensor {
    let std = train.to_kind(Kind::Float).std_dim([0i64].as_slice(), false, true);
    let floor = (std.mean(Kind::Float).double_value(&[]) * 1e-2).max(1e-6);
    std.clamp_min(floor)
}

/// Everything the probes of a sweep read: the labels of the training and test splits (N x columns)
/// and, per encoder, their features; the test rows' studies and clusters; the validation split; for
/// fine-tuning also the images and each encoder's variables.
pub struct SweepData {
    pub columns: Vec<String>,
    pub train_y: Tensor,
    pub test_y: Tensor,
    pub features: Vec<(EncoderSource, Tensor, Tensor)>,
    pub test_rows: Rows,
    pub validation: Option<ValidationData>,
    pub finetune: Option<FineTuneData>,
}

/// The validation split: labels, each encoder's features, the images (fine-tuning only), the rows'
/// studies.
pub struct ValidationData {
    pub y: Tensor,
    pub features: Vec<(EncoderSource, Tensor)>,
    pub images: Option<Tensor>,
    pub rows: Rows,
}

/// What fine-tuning tasks start from.
pub struct FineTuneData {
    /// Both splits' images at the encoder's input size (N x 1 x S x S), rows as in the labels.
    pub train_images: Tensor,
    pub test_images: Tensor,
    /// Each encoder's variables (VarStore names), BatchNorm statistics included.
    pub encoders: Vec<(EncoderSource, Vec<(String, Tensor)>)>,
    pub config: crate::engine::model::EncoderConfig,
    pub device: Device,
}

impl FineTuneData {
    /// A fresh copy of `source`'s encoder.
    fn encoder(&self, source: EncoderSource) -> Result<(nn::VarStore, crate::engine::model::Encoder), String> {
        let (_, state) = self
            .encoders
            .iter()
            .find(|(e, _)| *e == source)
            .ok_or_else(|| format!("no {source:?} encoder to fine-tune"))?;
        let (vs, encoder) = with_torch_seed(0, || {
            let vs = nn::VarStore::new(self.device);
            let encoder = crate::engine::model::Encoder::new(&vs.root(), self.config);
            (vs, encoder)
        });
        let state: std::collections::HashMap<&str, &Tensor> = state.iter().map(|(n, t)| (n.as_str(), t)).collect();
        for (name, t) in vs.variables() {
            let source = state.get(name.as_str()).ok_or_else(|| format!("encoder variable {name} was not kept"))?;
            tch::no_grad(|| t.shallow_clone().copy_(source));
        }
        Ok((vs, encoder))
    }
}

/// Trains and evaluates the probe of `task` (the section gives what the grid does not vary).
pub fn run_task(task: &ProbeTask, section: &ProbeSection, data: &SweepData, rank: u32) -> Result<ProbeOutcome, String> {
    let started = std::time::Instant::now();
    let config = ProbeConfig {
        hidden: task.hidden,
        dropout: task.dropout,
        epochs: task.epochs,
        batch_size: section.batch_size,
        lr: section.lr,
        weight_decay: section.weight_decay,
        optimizer: match section.optimizer {
            ProbeOptimizerName::Sgd => ProbeOptimizer::Sgd { momentum: section.momentum },
            ProbeOptimizerName::Adam => ProbeOptimizer::Adam,
            ProbeOptimizerName::Lars => ProbeOptimizer::Lars,
        },
        seed: task.seed,
        bootstrap: section.bootstrap,
    };
    // The intervals come from the cluster bootstrap below, not from the image-level one.
    let config = ProbeConfig { bootstrap: 0, ..config };
    let validation_y = data.validation.as_ref().map(|v| &v.y);
    let result = if task.finetune {
        let tune = data.finetune.as_ref().ok_or("a fine-tuning task, but the sweep kept no images (probe.finetune)")?;
        let (vs, encoder) = tune.encoder(task.encoder)?;
        let how = FineTune {
            encoder: &encoder,
            vs: &vs,
            stages: section.finetune_blocks,
            lr_scale: section.finetune_lr_scale,
        };
        let validation = data.validation.as_ref().and_then(|v| v.images.as_ref()).zip(validation_y);
        finetune_probe_validated(
            &how,
            &tune.train_images,
            &data.train_y,
            validation,
            &tune.test_images,
            &data.test_y,
            &config,
        )
    } else {
        let (_, train_x, test_x) = data
            .features
            .iter()
            .find(|(e, _, _)| *e == task.encoder)
            .ok_or_else(|| format!("task {}: no features for the {:?} encoder", task.id, task.encoder))?;
        let validation = data
            .validation
            .as_ref()
            .and_then(|v| v.features.iter().find(|(e, _)| *e == task.encoder).map(|(_, x)| x))
            .zip(validation_y);
        train_probe_validated(train_x, &data.train_y, validation, test_x, &data.test_y, &config)
    }
    .map_err(|e| format!("task {} ({}): {e}", task.id, task.configuration()))?;
    let outcomes = |scores: &[f64], y: &Tensor, rows: &Rows, resamples: usize| -> Result<Vec<ClassOutcome>, String> {
        let labels = Vec::<f64>::try_from(y.to_kind(Kind::Double).flatten(0, -1)).map_err(|e| e.to_string())?;
        let k = data.columns.len().max(1);
        Ok(data
            .columns
            .iter()
            .enumerate()
            .map(|(c, column)| {
                let s: Vec<f64> = scores.iter().skip(c).step_by(k).copied().collect();
                let y: Vec<bool> = labels.iter().skip(c).step_by(k).map(|&v| v > 0.5).collect();
                ClassOutcome { column: column.clone(), ..class_metrics(&s, &y, rows, resamples, task.seed) }
            })
            .collect())
    };
    let classes = outcomes(&result.test_scores, &data.test_y, &data.test_rows, section.bootstrap)?;
    let validation = match &data.validation {
        Some(v) if !result.validation_scores.is_empty() => outcomes(&result.validation_scores, &v.y, &v.rows, 0)?,
        _ => Vec::new(),
    };
    Ok(ProbeOutcome {
        task: task.clone(),
        rank,
        seconds: started.elapsed().as_secs_f64(),
        curves: result.curves.clone(),
        classes,
        validation,
        error: None,
    })
}

/// Features of `images` (N x 1 x H x W) from a frozen encoder forward (BatchNorm in eval mode, no
/// gradient), in batches of `batch`.
pub fn embed(encoder: &crate::engine::model::Encoder, images: &Tensor, batch: i64, device: Device) -> Tensor {
    tch::no_grad(|| {
        let n = images.size()[0];
        let mut parts = Vec::new();
        let mut start = 0;
        while start < n {
            let len = batch.min(n - start);
            let x = images.narrow(0, start, len).to_device(device);
            let mut pass = crate::engine::model::LocalNorm { train: false };
            parts.push(encoder.forward_with(&x, &mut pass).to_device(Device::Cpu));
            start += len;
        }
        if parts.is_empty() {
            Tensor::zeros([0, encoder.feature_dim], (Kind::Float, Device::Cpu))
        } else {
            Tensor::cat(&parts, 0)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two Gaussian classes whose means differ along a few dimensions: separable well above chance.
    fn blobs(n: i64, d: i64, seed: u64) -> (Tensor, Tensor) {
        with_torch_seed(seed, || {
            let y = Tensor::rand([n, 1], (Kind::Float, Device::Cpu)).ge(0.5).to_kind(Kind::Float);
            let shift = Tensor::zeros([1, d], (Kind::Float, Device::Cpu));
            let _ = shift.narrow(1, 0, 3).fill_(1.5);
            let x = Tensor::randn([n, d], (Kind::Float, Device::Cpu)) + &y * shift + 5.0;
            (x, y)
        })
    }

    #[test]
    fn probes_learn_separable_classes_and_are_reproducible() {
        let (train_x, train_y) = blobs(400, 16, 1);
        let (test_x, test_y) = blobs(200, 16, 2);
        for hidden in [0, 32] {
            let config = ProbeConfig { hidden, dropout: 0.2, epochs: 10, bootstrap: 200, ..ProbeConfig::default() };
            let r = train_probe(&train_x, &train_y, &test_x, &test_y, &config).unwrap();
            let m = &r.classes[0];
            assert!(m.accuracy > 0.85, "hidden {hidden}: accuracy {}", m.accuracy);
            assert!(m.auc.unwrap() > 0.93, "hidden {hidden}: auc {:?}", m.auc);
            let (lo, hi) = m.auc_ci.unwrap();
            assert!(lo <= m.auc.unwrap() && m.auc.unwrap() <= hi);
            assert_eq!(r.curves.len(), 10);
            assert!(r.curves[9].train_loss < r.curves[0].train_loss, "{:?}", r.curves);
            // The reported accuracy is the last epoch's.
            assert!((r.last().test_accuracy - m.accuracy).abs() < 1e-9);
            let again = train_probe(&train_x, &train_y, &test_x, &test_y, &config).unwrap();
            assert_eq!(again, r, "same seed, different result");
            let other = train_probe(&train_x, &train_y, &test_x, &test_y, &ProbeConfig { seed: 1, ..config }).unwrap();
            assert_ne!(other.test_scores, r.test_scores);
        }
    }

    #[test]
    fn a_task_of_the_grid_becomes_a_reported_outcome() {
        let (train_x, train_y) = blobs(200, 8, 6);
        let (test_x, test_y) = blobs(80, 8, 7);
        let section = ProbeSection {
            hidden: vec![16],
            dropout: vec![0.2],
            epochs: vec![5],
            seeds: 1,
            lr: 0.1,
            bootstrap: 50,
            ..ProbeSection::default()
        };
        let data = SweepData {
            columns: vec!["Typical Appearance".into()],
            train_y,
            test_y,
            features: vec![
                (EncoderSource::Simclr, train_x.shallow_clone(), test_x.shallow_clone()),
                (EncoderSource::Random, train_x.shallow_clone() * 0.0, test_x.shallow_clone() * 0.0),
            ],
            test_rows: Rows::default(),
            validation: None,
            finetune: None,
        };
        let tasks = section.expand(0);
        assert_eq!(tasks.len(), 4); // linear + MLP, x 2 encoders
        let outcomes: Vec<ProbeOutcome> = tasks.iter().map(|t| run_task(t, &section, &data, 1).unwrap()).collect();
        for (t, o) in tasks.iter().zip(&outcomes) {
            assert_eq!(&o.task, t);
            assert_eq!((o.rank, o.curves.len()), (1, 5));
            assert_eq!(o.classes[0].column, "Typical Appearance");
            assert!(o.classes[0].auc_ci.is_some());
        }
        // Informative features beat constant ones, which leave the probe at chance.
        for o in &outcomes[..2] {
            assert!(o.classes[0].auc.unwrap() > 0.85, "{:?}", o.classes);
        }
        assert!((outcomes[3].classes[0].auc.unwrap() - 0.5).abs() < 0.1, "{:?}", outcomes[3].classes);
    }

    /// Images whose label is a bright patch in the lower half, for fine-tuning a tiny encoder.
    fn patches(n: i64, seed: u64) -> (Tensor, Tensor) {
        with_torch_seed(seed, || {
            let y = Tensor::rand([n, 1], (Kind::Float, Device::Cpu)).ge(0.5).to_kind(Kind::Float);
            let x = Tensor::rand([n, 1, 32, 32], (Kind::Float, Device::Cpu)) * 0.5;
            let patch = Tensor::zeros([1, 1, 32, 32], (Kind::Float, Device::Cpu));
            let _ = patch.narrow(2, 20, 8).narrow(3, 4, 24).fill_(0.8);
            (x + y.view([n, 1, 1, 1]) * patch, y)
        })
    }

    /// Fine-tuning the last stage trains exactly that stage (and the head), its BatchNorm in train mode:
    /// every other encoder variable and BatchNorm statistic stays bitwise the same, the kept copy is untouched, and
    /// the training loss falls. Through `run_task`, a fine-tuning task reports like any other.
    #[test]
    fn fine_tuning_trains_only_the_stages_asked_for() {
        use crate::engine::model::{Encoder, EncoderConfig};
        let config = EncoderConfig::tiny();
        let (vs, encoder) = with_torch_seed(3, || {
            let vs = nn::VarStore::new(Device::Cpu);
            let encoder = Encoder::new(&vs.root(), config);
            (vs, encoder)
        });
        let before: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
        let stages = before
            .iter()
            .filter_map(|(n, _)| n.strip_prefix("layer")?.split('.').next()?.parse::<usize>().ok())
            .max()
            .unwrap();
        let (train_x, train_y) = patches(64, 1);
        let (test_x, test_y) = patches(32, 2);
        let probe = ProbeConfig { hidden: 8, epochs: 6, lr: 0.01, bootstrap: 0, ..ProbeConfig::default() };
        let tune = FineTune { encoder: &encoder, vs: &vs, stages: 1, lr_scale: 1.0 };
        let r = finetune_probe(&tune, &train_x, &train_y, &test_x, &test_y, &probe).unwrap();
        assert!(r.curves[5].train_loss < r.curves[0].train_loss, "{:?}", r.curves);
        let after: std::collections::HashMap<String, Tensor> = vs.variables().into_iter().collect();
        let last = format!("layer{stages}.");
        let mut changed = 0;
        for (name, old) in &before {
            let same = old.equal(&after[name]);
            if name.starts_with(&last) {
                changed += usize::from(!same);
                // BatchNorm trains in the fine-tuned stage: its running statistics move.
                assert!(!name.ends_with("running_mean") || !same, "{name}: a fine-tuned stage kept its statistics");
            } else {
                assert!(same, "{name} changed, but only {last}* was fine-tuned");
            }
        }
        assert!(changed > 0, "no variable of {last}* changed");

        let state: Vec<(String, Tensor)> = before.iter().map(|(n, t)| (n.clone(), t.copy())).collect();
        let data = SweepData {
            columns: vec!["Typical Appearance".into()],
            train_y,
            test_y,
            features: vec![],
            test_rows: Rows::default(),
            validation: None,
            finetune: Some(FineTuneData {
                train_images: train_x,
                test_images: test_x,
                encoders: vec![(EncoderSource::Simclr, state)],
                config,
                device: Device::Cpu,
            }),
        };
        let section = ProbeSection {
            finetune_blocks: 1,
            finetune_lr_scale: 1.0,
            lr: 0.01,
            bootstrap: 0,
            ..ProbeSection::default()
        };
        let task = ProbeTask {
            id: 0,
            encoder: EncoderSource::Simclr,
            hidden: 8,
            dropout: 0.0,
            epochs: 6,
            seed: 0,
            finetune: true,
        };
        let outcome = run_task(&task, &section, &data, 0).unwrap();
        assert_eq!(outcome.curves, r.curves, "the same fine-tuning through run_task");
        let kept = &data.finetune.as_ref().unwrap().encoders[0].1;
        assert!(kept.iter().zip(&before).all(|((_, a), (_, b))| a.equal(b)), "run_task changed the kept encoder");
    }

    /// Study-level metrics average each study's image scores: the hand-computed case of
    /// `simclr_common::metrics` (three studies of 2, 3 and 1 images) through `class_metrics`; without
    /// rows every image is its own study.
    #[test]
    fn class_metrics_score_studies_by_their_mean_image_score() {
        let scores = [0.9, 0.5, 0.2, 0.4, 0.6, 0.3];
        let labels = [true, true, false, false, false, true];
        let rows = Rows { study: vec![10, 10, 20, 20, 20, 30], cluster: vec![0, 0, 0, 0, 0, 1] };
        let m = class_metrics(&scores, &labels, &rows, 200, 1);
        assert!((m.auc.unwrap() - 6.0 / 9.0).abs() < 1e-12, "{m:?}");
        assert_eq!(m.study_auc, Some(0.5));
        assert!((m.study_average_precision.unwrap() - 5.0 / 6.0).abs() < 1e-12, "{m:?}");
        let (lo, hi) = m.study_auc_ci.unwrap();
        assert!([0.5, 1.0].contains(&lo) && [0.5, 1.0].contains(&hi), "{m:?}");
        let plain = class_metrics(&scores, &labels, &Rows::default(), 0, 1);
        assert_eq!((plain.study_auc, plain.auc_ci), (plain.auc, None));
    }

    #[test]
    fn several_classes_get_their_own_metrics() {
        let (train_x, a) = blobs(300, 8, 3);
        let (test_x, b) = blobs(100, 8, 4);
        // Class 1 is the complement of class 0: the probe must learn both.
        let train_y = Tensor::cat(&[&a, &(1.0 - &a)], 1);
        let test_y = Tensor::cat(&[&b, &(1.0 - &b)], 1);
        let config = ProbeConfig { hidden: 0, epochs: 30, lr: 0.05, bootstrap: 0, ..ProbeConfig::default() };
        let r = train_probe(&train_x, &train_y, &test_x, &test_y, &config).unwrap();
        assert_eq!(r.classes.len(), 2);
        assert_eq!(r.test_scores.len(), 200);
        for m in &r.classes {
            assert!(m.auc.unwrap() > 0.9, "{m:?}");
            assert_eq!(m.auc_ci, None);
        }
    }

    #[test]
    fn embedding_in_batches_equals_one_pass_in_eval_mode() {
        use crate::engine::model::{Encoder, EncoderConfig};
        let vs = nn::VarStore::new(Device::Cpu);
        let encoder = with_torch_seed(0, || Encoder::new(&vs.root(), EncoderConfig::tiny()));
        let images = with_torch_seed(1, || Tensor::rand([10, 1, 32, 32], (Kind::Float, Device::Cpu)));
        let whole = embed(&encoder, &images, 10, Device::Cpu);
        let batched = embed(&encoder, &images, 3, Device::Cpu);
        assert_eq!(whole.size(), [10, encoder.feature_dim]);
        assert!(!whole.requires_grad());
        let diff = (&whole - &batched).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "batching changed the features by {diff}");
    }

    #[test]
    fn bad_shapes_and_divergence_are_errors() {
        let (x, y) = blobs(50, 4, 5);
        let e = train_probe(&x.view([-1]), &y, &x, &y, &ProbeConfig::default()).unwrap_err();
        assert!(e.contains("N x d"), "{e}");
        let e = train_probe(&x, &y, &x.narrow(1, 0, 2), &y, &ProbeConfig::default()).unwrap_err();
        assert!(e.contains("do not match"), "{e}");
        let wild = ProbeConfig { lr: 1e30, epochs: 3, ..ProbeConfig::default() };
        let e = train_probe(&x, &y, &x, &y, &wild).unwrap_err();
        assert!(e.contains("diverged") && e.contains("learning rate"), "{e}");
    }
}
