//! SimCLR pretraining on one worker: the step (two views, encoder, head, NT-Xent, optimiser), the
//! online monitor (loss, contrastive accuracy, learning rate, images/s) and checkpoints that resume
//! exactly. The distributed engine reuses the step with gathered keys.
//!
//! A checkpoint is a directory `step-NNNNNNNN/` holding `encoder.safetensors` (torchvision names: it
//! loads into torchvision as it is), `head.safetensors`, `optimizer.safetensors` and `state.json`
//! (step, epoch, position in the epoch, the effective configuration). It is written into a temporary
//! directory and renamed into place, and `latest` (the name of the newest) is replaced atomically, so a
//! crash leaves the previous checkpoint intact. The augmentations' randomness derives from (seed,
//! sample, epoch, view) and the epoch order from (seed, epoch), so nothing else needs saving.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use simclr_common::atomic_file;
use tch::{nn, Device, Kind, Tensor};

use crate::comm::queued::Queued;
use crate::comm::{f32s_to_u64, u64_to_f32s, Collective, CollectiveError, Solo, Timed};
use crate::engine::augment::two_views;
use crate::engine::loss::{cosine_similarity, mask_own, nt_xent_from_similarity, AnchorRows};
use crate::engine::model::{
    load_encoder, save_encoder, var_store_drawn_on_cpu, with_torch_seed, Encoder, EncoderConfig, HeadConfig, LocalNorm,
    NormPass, ProjectionHead, HEAD_PREFIX,
};
use crate::engine::numerics::{to_float, Numerics};
use crate::engine::optim::{scaled_lr, warmup_cosine, Algorithm, LrScaling, Optimizer, Param};
use crate::engine::overlap::GradReducer;
use crate::engine::syncbn::{Grouped, SyncNorm};

pub use simclr_common::pretrain::{BnMode, LrScalingName, OptimizerName, PretrainSection as PretrainConfig};

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("non-finite loss {loss} at step {step}; last good checkpoint: {}", last_checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "none".into()))]
    NonFinite { step: u64, loss: f64, last_checkpoint: Option<PathBuf> },
    #[error("checkpoint {path}: {message}")]
    Checkpoint { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Collective(#[from] CollectiveError),
    #[error("stopped: {0}")]
    Interrupted(String),
    /// The epoch's data could not be had; `retryable`: whether another attempt may get it (the
    /// coordinator unreachable) or not (no image decodes).
    #[error("{message}")]
    Data { message: String, retryable: bool },
}

/// One epoch's images on this rank held whole (N x 1 x S x S in [0, 1]) in step order, with each row's
/// sample id: the [`EpochSource`] of [`Trainer::fit`] and the tests.
pub struct EpochData {
    pub images: Tensor,
    pub ids: Vec<u64>,
}

/// One epoch's data on this rank, read a batch at a time, in step order: batch t is slots
/// [t b, (t + 1) b) for the local batch b. Each slot's sample id is what its augmentations derive from,
/// so it must name the image (and its occurrence in the epoch) the same way whatever the world size.
pub trait EpochSource: Send {
    /// Slots in the epoch.
    fn slots(&self) -> usize;
    /// Batch `position` (`size` slots): images (size x 1 x S x S, float32 in [0, 1]) and sample ids.
    /// Positions are asked in order; an out-of-order one may cost a restart of any reading ahead.
    fn batch(&mut self, position: usize, size: usize) -> Result<(Tensor, Vec<u64>), TrainError>;
}

impl EpochSource for EpochData {
    fn slots(&self) -> usize {
        self.ids.len().min(self.images.size()[0] as usize)
    }

    fn batch(&mut self, position: usize, size: usize) -> Result<(Tensor, Vec<u64>), TrainError> {
        let start = position * size;
        Ok((self.images.narrow(0, start as i64, size as i64), self.ids[start..start + size].to_vec()))
    }
}

/// What one step reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct StepStats {
    pub step: u64,
    pub epoch: u64,
    pub loss: f64,
    /// Share of anchors whose most similar key (itself excluded) is their positive.
    pub contrastive_accuracy: f64,
    pub lr: f64,
    pub images_per_second: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct SavedState {
    step: u64,
    epoch: u64,
    position: usize,
    config: PretrainConfig,
    /// The run's seed (`job.seed`: weights, order, augmentations).
    #[serde(default)]
    seed: Option<u64>,
    /// What else the run's course depends on (`Trainer::run_keys`).
    #[serde(default)]
    run: serde_json::Value,
}

/// Keys that never change a run's course: a resumed run may differ in them freely.
const FREE_KEYS: [&str; 12] = [
    "pretrain.monitor.every_epochs",
    "pretrain.monitor.knn_k",
    "pretrain.monitor.knn_temperature",
    "pretrain.checkpoint_every",
    "pretrain.log_every_steps",
    "pretrain.bucket_mb",
    "pretrain.precision",
    "pretrain.channels_last",
    "pretrain.max_steps",
    "pretrain.enabled",
    "pretrain.init_weights",
    "pretrain.allow_config_change",
];

/// `value` as dotted keys under `prefix` ("pretrain.augment.crop_scale" = [0.8, 1.0]).
fn flatten(prefix: &str, value: &serde_json::Value, out: &mut std::collections::BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(fields) => {
            for (k, v) in fields {
                flatten(&format!("{prefix}.{k}"), v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// The keys in which a checkpoint's training config differs from this run's, with both values,
/// leaving out `FREE_KEYS` and the ones the run allows to change.
fn config_changes(saved: &SavedState, config: &PretrainConfig, run: &serde_json::Value) -> Vec<String> {
    let keys = |c: &PretrainConfig, seed: Option<u64>, run: &serde_json::Value| {
        let mut out = std::collections::BTreeMap::new();
        flatten("pretrain", &serde_json::to_value(c).unwrap_or_default(), &mut out);
        if let Some(seed) = seed {
            out.insert("job.seed".into(), seed.to_string());
        }
        if let serde_json::Value::Object(fields) = run {
            for (k, v) in fields {
                out.insert(k.clone(), v.to_string());
            }
        }
        out
    };
    // A checkpoint from before the run keys were saved compares on the pretrain keys alone.
    let current_run = if saved.run.is_null() { &serde_json::Value::Null } else { run };
    let (before, now) =
        (keys(&saved.config, saved.seed, &saved.run), keys(config, saved.seed.map(|_| config.seed), current_run));
    let mut all: Vec<&String> = before.keys().chain(now.keys()).collect();
    all.sort();
    all.dedup();
    all.into_iter()
        .filter(|k| !FREE_KEYS.contains(&k.as_str()) && !config.allow_config_change.iter().any(|a| a == *k))
        .filter_map(|k| {
            let (a, b) = (before.get(k), now.get(k));
            (a != b).then(|| {
                let show = |v: Option<&String>| v.cloned().unwrap_or_else(|| "(absent)".into());
                format!("{k}: {} in the checkpoint, {} now", show(a), show(b))
            })
        })
        .collect()
}

/// A step whose loss and correct-anchor count are still on the device.
struct PendingStep {
    /// The step number after it (as [`StepStats::step`]).
    step: u64,
    epoch: u64,
    lr: f64,
    /// Images of the global batch, and anchors (two views each).
    images: f64,
    /// [loss, anchors whose best match is their positive], float32, summed over the ranks.
    values: Tensor,
}

/// A model, its optimiser and where training stands.
pub struct Trainer {
    pub config: PretrainConfig,
    pub vs: nn::VarStore,
    pub encoder: Encoder,
    pub head: ProjectionHead,
    optimizer: Optimizer,
    pub step: u64,
    pub epoch: u64,
    /// Batches of the current epoch already done.
    pub position: usize,
    pub steps_per_epoch: u64,
    last_checkpoint: Option<PathBuf>,
    /// The step's collectives. With more than one rank: the [`Queued`] one of the gradient buckets
    /// (one queue for everything), or, after [`Trainer::use_gradient_collective`], the job's collective
    /// called directly (timed).
    collective: Arc<dyn Collective>,
    /// Where the gradient buckets are summed (with more than one rank).
    queue: Option<Arc<Queued>>,
    /// The step's own collectives when the buckets have a collective of their own.
    direct: Option<Arc<Timed>>,
    /// The job's collective as given.
    given: Arc<dyn Collective>,
    bucket_bytes: usize,
    /// Images per step on this rank: the global batch divided by the world size.
    pub local_batch: usize,
    /// The gradients' sum over the ranks (with more than one).
    reducer: Option<GradReducer>,
    /// Steps whose loss and contrastive accuracy are still on the device (see [`Trainer::resolve`]).
    pending: Vec<PendingStep>,
    /// When the last pending steps were read back (images per second are averaged since then).
    last_resolved: Instant,
    /// Precision and layout of the encoder and head (the encoder holds the same).
    numerics: Numerics,
    /// Steps between read-backs in [`Trainer::fit_epochs`]: `pretrain.log_every_steps` on CUDA, 1 on
    /// the CPU, where reading a value back costs nothing (and the monitor sees every step at once).
    pub read_back_every: u64,
    /// What the run's course depends on beyond `config` and its seed (the data's split and order), as
    /// {"data.split_seed": .., ...}: saved with each checkpoint and compared on resuming.
    pub run_keys: serde_json::Value,
    /// The last step's encoder features of this rank's samples (first view, detached, float32): what an
    /// online classifier beside the step learns from.
    pub last_features: Option<Tensor>,
}

impl Trainer {
    /// A freshly initialised model (weights from `seed`) for a dataset of `dataset_len` images.
    pub fn new(config: PretrainConfig, dataset_len: usize, device: Device) -> Result<Trainer, TrainError> {
        Trainer::distributed(config, dataset_len, device, Arc::new(Solo))
    }

    /// A replica of the model on one rank of `collective`'s world, for `dataset_len` images (slots)
    /// per epoch (the same length on every rank). Every rank draws the same initial weights from the seed.
    pub fn distributed(
        config: PretrainConfig,
        dataset_len: usize,
        device: Device,
        collective: Arc<dyn Collective>,
    ) -> Result<Trainer, TrainError> {
        let world = collective.world_size();
        if !config.batch_size.is_multiple_of(world) {
            return Err(TrainError::Config(format!(
                "pretrain.batch_size {} is not a multiple of the world size {world}",
                config.batch_size
            )));
        }
        if config.bn_group_size > 0 && config.bn_group_size < world && !world.is_multiple_of(config.bn_group_size) {
            return Err(TrainError::Config(format!(
                "pretrain.bn_group_size {} does not divide the world size {world}",
                config.bn_group_size
            )));
        }
        let local_batch = config.batch_size / world;
        if local_batch == 0 || dataset_len < local_batch {
            return Err(TrainError::Config(format!(
                "batch size {} ({local_batch} per rank) with {dataset_len} images per rank: need one full batch",
                config.batch_size
            )));
        }
        if config.batch_size < 2 {
            return Err(TrainError::Config("pretrain.batch_size: need at least 2 images per batch".into()));
        }
        let (vs, (encoder, head)) = with_torch_seed(config.seed, || {
            var_store_drawn_on_cpu(device, |root| {
                let encoder = Encoder::new(root, EncoderConfig::of(&config));
                let hidden = if config.head_hidden > 0 { config.head_hidden } else { encoder.feature_dim };
                let head = ProjectionHead::new(
                    &(root / HEAD_PREFIX),
                    encoder.feature_dim,
                    HeadConfig {
                        layers: config.head_layers,
                        hidden,
                        out: config.head_out,
                        batch_norm: config.head_batch_norm,
                    },
                );
                (encoder, head)
            })
        });
        let numerics = Numerics::new(config.precision, config.channels_last, device);
        numerics.apply_process_settings();
        encoder.set_numerics(&vs, numerics);
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        // Every gradient exists from the start (zeros), so that each rank contributes a value for every
        // parameter to the gradient all-reduce.
        let zero: Tensor = named.iter().map(|(_, t)| (t * 0.0).sum(Kind::Float)).sum();
        zero.backward();
        let given = Arc::clone(&collective);
        let (collective, queue) = if world > 1 {
            let queue = Arc::new(Queued::new(collective));
            (Arc::clone(&queue) as Arc<dyn Collective>, Some(queue))
        } else {
            (collective, None)
        };
        let bucket_bytes = (config.bucket_mb * 1e6) as usize;
        let reducer = match &queue {
            Some(q) => {
                let tensors = named.iter().map(|(_, t)| t.shallow_clone()).collect();
                Some(GradReducer::new(tensors, Arc::clone(q), bucket_bytes).map_err(TrainError::Config)?)
            }
            None => None,
        };
        let params = named.into_iter().map(|(name, t)| Param::new(name, t)).collect();
        let algorithm = match config.optimizer {
            OptimizerName::Lars => Algorithm::Lars {
                momentum: config.momentum,
                trust_coefficient: 0.001,
                weight_decay: config.weight_decay,
            },
            OptimizerName::Sgd => {
                Algorithm::Sgd { momentum: config.momentum, nesterov: false, weight_decay: config.weight_decay }
            }
            OptimizerName::Adamw => {
                Algorithm::AdamW { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: config.weight_decay }
            }
        };
        let steps_per_epoch = (dataset_len / local_batch) as u64;
        Ok(Trainer {
            collective,
            queue,
            direct: None,
            given,
            bucket_bytes,
            local_batch,
            reducer,
            pending: Vec::new(),
            numerics,
            last_resolved: Instant::now(),
            read_back_every: if device.is_cuda() { config.log_every_steps.max(1) } else { 1 },
            optimizer: Optimizer::new(algorithm, params),
            config,
            vs,
            encoder,
            head,
            step: 0,
            epoch: 0,
            position: 0,
            steps_per_epoch,
            last_checkpoint: None,
            run_keys: serde_json::Value::Null,
            last_features: None,
        })
    }

    pub fn total_steps(&self) -> u64 {
        let all = self.steps_per_epoch * self.config.epochs;
        if self.config.max_steps > 0 {
            all.min(self.config.max_steps)
        } else {
            all
        }
    }

    pub fn lr_at(&self, step: u64) -> f64 {
        let scaling = match self.config.lr_scaling {
            LrScalingName::Linear => LrScaling::Linear,
            LrScalingName::Sqrt => LrScaling::Sqrt,
            LrScalingName::None => LrScaling::None,
        };
        let peak = scaled_lr(self.config.base_lr, self.config.batch_size, scaling);
        let warmup = (self.config.warmup_epochs * self.steps_per_epoch as f64).round() as u64;
        warmup_cosine(peak, step, warmup, self.steps_per_epoch * self.config.epochs)
    }

    /// One optimisation step on a batch: `images` B x 1 x S x S in [0, 1] with their sample ids.
    /// Its loss and accuracy are read back at once.
    pub fn train_step(&mut self, images: &Tensor, samples: &[u64]) -> Result<StepStats, TrainError> {
        self.last_resolved = Instant::now();
        let images = images.to_device(self.vs.device());
        let views =
            two_views(&self.config.augment, &images, samples, self.config.seed, self.epoch, self.config.input_size);
        self.step_on_views(views, samples.len())?;
        let mut stats = self.resolve()?;
        Ok(stats.pop().expect("the step just taken"))
    }

    /// Reads the pending steps' loss and accuracy back to the host, all in one transfer (the only
    /// point where the host waits for the device), and returns their stats in order. Images per second
    /// are averaged over the steps since the last read-back. A non-finite loss is an error naming the
    /// first such step: its update has been applied, so the run goes back to its last checkpoint
    /// (checkpoints are written only after a read-back, so never from such weights).
    fn resolve(&mut self) -> Result<Vec<StepStats>, TrainError> {
        if self.pending.is_empty() {
            return Ok(Vec::new());
        }
        let pending = std::mem::take(&mut self.pending);
        let parts: Vec<Tensor> = pending.iter().map(|p| p.values.shallow_clone()).collect();
        let values = Tensor::stack(&parts, 0).to_device(Device::Cpu).to_kind(Kind::Double);
        let values = Vec::<f64>::try_from(values.reshape([-1]))
            .map_err(|e| TrainError::Config(format!("reading the loss back: {e}")))?;
        let seconds = self.last_resolved.elapsed().as_secs_f64().max(1e-9) / pending.len() as f64;
        self.last_resolved = Instant::now();
        let mut out = Vec::with_capacity(pending.len());
        for (p, v) in pending.iter().zip(values.chunks(2)) {
            if !v[0].is_finite() {
                return Err(TrainError::NonFinite {
                    step: p.step - 1,
                    loss: v[0],
                    last_checkpoint: self.last_checkpoint.clone(),
                });
            }
            out.push(StepStats {
                step: p.step,
                epoch: p.epoch,
                loss: v[0],
                contrastive_accuracy: v[1] / (2.0 * p.images),
                lr: p.lr,
                images_per_second: p.images / seconds,
            });
        }
        Ok(out)
    }

    /// The step on the batch's two views (each n x 1 x input x input, n = this rank's images),
    /// computed ahead by [`Trainer::fit`].
    ///
    /// With more than one rank: the projections z of every rank are all-gathered (rank-major, so this
    /// rank's 2n rows start at rank x 2n); this rank's loss is that of its own anchors against every key,
    /// divided by the global anchor count, so the ranks' losses add up to the single-process loss. Its
    /// backward gives a gradient for every gathered key; those are summed back to the rank that owns
    /// each key (reduce-scatter) and continue into its encoder. Parameter gradients are then summed over
    /// the ranks (all-reduce), never rescaled: every replica applies the same update.
    ///
    /// Nothing is read back to the host: the loss and accuracy join the pending steps.
    fn step_on_views(&mut self, (v0, v1): (Tensor, Tensor), n: usize) -> Result<(), TrainError> {
        let n = n as i64;
        let world = self.collective.world_size() as i64;
        let rank = self.collective.rank() as i64;
        let views = Tensor::cat(&[v0, v1], 0).to_kind(Kind::Float);
        let group = match self.config.bn_group_size {
            0 => world as usize,
            g => g.min(world as usize),
        };
        let sync_bn = world > 1 && group > 1 && self.config.bn == BnMode::Sync;
        let collective = Arc::clone(&self.collective);
        let grouped = Grouped::new(&*collective, group);
        let mut sync = if group < world as usize { SyncNorm::new(&grouped) } else { SyncNorm::new(&*collective) };
        let mut local = LocalNorm { train: true };
        let pass: &mut dyn NormPass = if sync_bn { &mut sync } else { &mut local };
        // The encoder runs in its own precision and returns float32; the head's output is float32 again
        // before the loss, which is always computed in float32.
        let h = self.encoder.forward_with(&views, pass);
        self.last_features = Some(h.narrow(0, 0, n).detach());
        let z = to_float(self.numerics.autocast(|| self.head.forward_with(&h, pass)));
        self.optimizer.zero_grad();
        let rows = AnchorRows::rank_block(n, rank);
        let values = if world == 1 {
            let similarity = cosine_similarity(&z, &z);
            let loss = nt_xent_from_similarity(&similarity, &rows, self.config.temperature, 2 * n);
            let correct = correct_anchors(&similarity.detach(), &rows);
            loss.backward();
            Tensor::stack(&[loss.detach().to_kind(Kind::Float), correct], 0)
        } else {
            let keys = collective.all_gather(&z.detach())?.set_requires_grad(true);
            let anchors = keys.narrow(0, rank * 2 * n, 2 * n);
            let similarity = cosine_similarity(&anchors, &keys);
            let loss = nt_xent_from_similarity(&similarity, &rows, self.config.temperature, 2 * n * world);
            let correct = correct_anchors(&similarity.detach(), &rows);
            loss.backward();
            let key_grads = keys.grad();
            let own = collective.reduce_scatter_sum(&key_grads)?;
            let reducer = self.reducer.as_mut().expect("a reducer with more than one rank");
            reducer.begin();
            let backward = if sync_bn {
                sync.backward(&z, &own)
            } else {
                (&z * own).sum(Kind::Float).backward();
                Ok(())
            };
            // The buckets started in the backward end either way (the other ranks wait for them).
            let reduced = reducer.finish();
            backward?;
            reduced?;
            collective.all_reduce_sum(&Tensor::stack(&[loss.detach().to_kind(Kind::Float), correct], 0))?
        };
        let lr = self.lr_at(self.step);
        self.optimizer.step(lr);
        self.step += 1;
        self.position += 1;
        self.pending.push(PendingStep { step: self.step, epoch: self.epoch, lr, images: (n * world) as f64, values });
        if self.position as u64 >= self.steps_per_epoch {
            self.epoch += 1;
            self.position = 0;
        }
        Ok(())
    }

    /// Seconds this trainer's thread has waited for collectives (the communication the step does not
    /// hide behind computation); `None` with one rank.
    pub fn exposed_communication_seconds(&self) -> Option<f64> {
        let direct = self.direct.as_ref().map_or(0.0, |d| d.seconds());
        self.queue.as_ref().map(|q| q.exposed_seconds() + direct)
    }

    /// Sums the gradient buckets over `gradients`, a second channel between the same ranks (a ring of
    /// its own), so that they never queue in front of the step's other collectives (synchronised
    /// BatchNorm's are small and wait for each other); the step then calls the job's collective
    /// directly. For backends whose channels share one device stream (NCCL) keep the single queue:
    /// two communicators on one stream, entered in different orders by different ranks, deadlock.
    /// Before the first step, on every rank alike.
    pub fn use_gradient_collective(&mut self, gradients: Arc<dyn Collective>) -> Result<(), TrainError> {
        if self.given.world_size() < 2 {
            return Ok(());
        }
        if gradients.world_size() != self.given.world_size() || gradients.rank() != self.given.rank() {
            return Err(TrainError::Config(format!(
                "the gradient collective is rank {} of {}, the job's rank {} of {}",
                gradients.rank(),
                gradients.world_size(),
                self.given.rank(),
                self.given.world_size()
            )));
        }
        let queue = Arc::new(Queued::new(gradients));
        let tensors = self.optimizer.params().iter().map(|p| p.tensor.shallow_clone()).collect();
        // The old reducer's hooks go before the new one's are set.
        self.reducer = None;
        self.reducer =
            Some(GradReducer::new(tensors, Arc::clone(&queue), self.bucket_bytes).map_err(TrainError::Config)?);
        let direct = Arc::new(Timed::new(Arc::clone(&self.given)));
        self.collective = Arc::clone(&direct) as _;
        self.direct = Some(direct);
        self.queue = Some(queue);
        Ok(())
    }

    /// Trains over `images` (N x 1 x S x S, sample id = row), in an order reshuffled every epoch from
    /// (seed, epoch), until the configured end, checkpointing into `checkpoints` when given; `monitor`
    /// sees every step.
    pub fn fit(
        &mut self,
        images: &Tensor,
        checkpoints: Option<&Path>,
        mut monitor: impl FnMut(&StepStats),
    ) -> Result<(), TrainError> {
        let n = images.size()[0] as usize;
        let seed = self.config.seed;
        self.fit_epochs(
            |epoch| {
                let order = shuffled(n, seed, epoch);
                let index = Tensor::from_slice(&order.iter().map(|&i| i as i64).collect::<Vec<_>>());
                let ids = order.iter().map(|&i| i as u64).collect();
                Ok(Box::new(EpochData { images: images.index_select(0, &index), ids }) as Box<dyn EpochSource>)
            },
            checkpoints,
            |stats| {
                monitor(stats);
                Ok(())
            },
            |_| Ok(()),
        )
    }

    /// Trains until the configured end on this rank's data of each epoch (`data(epoch)`, asked once
    /// per epoch, the next epoch's while the last step of the current one is prepared); `monitor` sees
    /// every step, in order, when its values are read back (see `read_back_every`), and may stop the
    /// run with an error; `after_step` sees the trainer after every step (an epoch just ended where
    /// `position` is 0 again), before any checkpoint of that step.
    pub fn fit_epochs(
        &mut self,
        mut data: impl FnMut(u64) -> Result<Box<dyn EpochSource>, TrainError>,
        checkpoints: Option<&Path>,
        mut monitor: impl FnMut(&StepStats) -> Result<(), TrainError>,
        mut after_step: impl FnMut(&Trainer) -> Result<(), TrainError>,
    ) -> Result<(), TrainError> {
        let total = self.total_steps();
        // The current epoch's source and, from its last step on, the next one's.
        let mut loaded: Vec<(u64, Box<dyn EpochSource>)> = Vec::new();
        let needed = self.steps_per_epoch * self.local_batch as u64;
        let mut load = |epoch: u64, loaded: &mut Vec<(u64, Box<dyn EpochSource>)>| -> Result<usize, TrainError> {
            if let Some(i) = loaded.iter().position(|(e, _)| *e == epoch) {
                return Ok(i);
            }
            let d = data(epoch)?;
            if (d.slots() as u64) < needed {
                return Err(TrainError::Config(format!(
                    "epoch {epoch}: {} slots, but this run needs {needed} per epoch",
                    d.slots()
                )));
            }
            loaded.push((epoch, d));
            Ok(loaded.len() - 1)
        };
        let device = self.vs.device();
        let b = self.local_batch;
        let mut batch_at = |epoch: u64, position: usize, loaded: &mut Vec<(u64, Box<dyn EpochSource>)>| {
            let i = load(epoch, loaded)?;
            let (images, ids) = loaded[i].1.batch(position, b)?;
            Ok::<_, TrainError>((images.to_device(device), ids))
        };
        // The views of the next batch are computed on another thread while this step runs.
        let mut ahead: Option<std::thread::JoinHandle<(Tensor, Tensor)>> = None;
        let first = self.step;
        self.pending.clear();
        self.last_resolved = Instant::now();
        while self.step < total {
            let views = match ahead.take() {
                Some(handle) => handle.join().expect("the augmentation thread panicked"),
                None => {
                    let (batch, ids) = batch_at(self.epoch, self.position, &mut loaded)?;
                    two_views(&self.config.augment, &batch, &ids, self.config.seed, self.epoch, self.config.input_size)
                }
            };
            if self.step + 1 < total {
                let (epoch, position) = if self.position as u64 + 1 >= self.steps_per_epoch {
                    (self.epoch + 1, 0)
                } else {
                    (self.epoch, self.position + 1)
                };
                let (batch, ids) = batch_at(epoch, position, &mut loaded)?;
                let (config, seed, size) = (self.config.augment, self.config.seed, self.config.input_size);
                ahead = Some(std::thread::spawn(move || two_views(&config, &batch, &ids, seed, epoch, size)));
            }
            self.step_on_views(views, self.local_batch)?;
            loaded.retain(|(e, _)| *e >= self.epoch);
            let every = self.config.checkpoint_every;
            let checkpoint =
                checkpoints.filter(|_| (every > 0 && self.step.is_multiple_of(every)) || self.step == total);
            // The monitor sees the steps when they are read back: every `read_back_every` steps, the
            // first and the last, and before a checkpoint (so that none is written from weights a
            // non-finite loss has reached).
            if checkpoint.is_some()
                || self.step == total
                || self.step == first + 1
                || self.step.is_multiple_of(self.read_back_every)
            {
                for stats in self.resolve()? {
                    monitor(&stats)?;
                }
            }
            after_step(self)?;
            if let Some(dir) = checkpoint {
                self.save_checkpoint(dir)?;
            }
        }
        Ok(())
    }

    /// CRC-32 over every variable of the model (head included, BatchNorm statistics included) and the
    /// optimiser's state, in name order.
    pub fn state_checksum(&self) -> u64 {
        let mut crc = crc32fast::Hasher::new();
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, t) in vars.into_iter().chain(self.optimizer.state()) {
            crc.update(name.as_bytes());
            let values = Vec::<f32>::try_from(t.detach().to_kind(Kind::Float).flatten(0, -1)).unwrap_or_default();
            crc.update(&values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        }
        u64::from(crc.finalize())
    }

    /// Before the first step of a run: every rank must stand at the same step with the same weights and
    /// optimiser state, or the replicas would drift apart from the start (a checkpoint or
    /// `init_weights` file that differs between hosts, say). Compares (step, epoch, position,
    /// [`Trainer::state_checksum`]) over the ranks; a mismatch names every rank that differs from rank 0.
    pub fn check_same_start(&self) -> Result<(), TrainError> {
        let mine = [self.step, self.epoch, self.position as u64, self.state_checksum()];
        let row: Vec<f32> = mine.iter().flat_map(|&v| u64_to_f32s(v)).collect();
        let all = self.collective.all_gather(&Tensor::from_slice(&row).view([1, 16]))?;
        let all = Vec::<f32>::try_from(all.flatten(0, -1)).map_err(|e| TrainError::Config(e.to_string()))?;
        let state =
            |r: usize| -> [u64; 4] { std::array::from_fn(|k| f32s_to_u64(&all[r * 16 + k * 4..r * 16 + k * 4 + 4])) };
        let describe = |r: usize| {
            let [step, epoch, position, crc] = state(r);
            format!("rank {r} at step {step} (epoch {epoch}, batch {position}) with state checksum {crc:08x}")
        };
        let differ: Vec<String> =
            (1..self.collective.world_size()).filter(|&r| state(r) != state(0)).map(describe).collect();
        if differ.is_empty() {
            return Ok(());
        }
        Err(TrainError::Config(format!(
            "the ranks would start pretraining from different states: {}, but {}",
            describe(0),
            differ.join(", ")
        )))
    }

    /// Writes `dir/step-NNNNNNNN/` atomically and points `dir/latest` at it. Every file is synced
    /// before the renames that publish it, so neither a killed process nor a lost machine leaves
    /// `latest` naming an incomplete checkpoint; the one it named before stays untouched until then.
    pub fn save_checkpoint(&mut self, dir: &Path) -> Result<PathBuf, TrainError> {
        let fail = |path: &Path, message: String| TrainError::Checkpoint { path: path.to_path_buf(), message };
        std::fs::create_dir_all(dir).map_err(|e| fail(dir, e.to_string()))?;
        let name = format!("step-{:08}", self.step);
        let final_dir = dir.join(&name);
        if latest_checkpoint(dir).is_ok_and(|latest| latest == final_dir) {
            // This very step is the last good checkpoint (a run resumed at its end): keep it.
            return Ok(final_dir);
        }
        for path in atomic_file::remove_stale_temporaries(dir) {
            tracing::info!(path = %path.display(), "removed a checkpoint left half-written by a killed writer");
        }
        let head: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(n, _)| n.starts_with(HEAD_PREFIX))
            .map(|(n, t)| (n, t.detach().to_device(Device::Cpu).contiguous()))
            .collect();
        let opt: Vec<(String, Tensor)> =
            self.optimizer.state().into_iter().map(|(n, t)| (n, t.to_device(Device::Cpu).contiguous())).collect();
        let state = SavedState {
            step: self.step,
            epoch: self.epoch,
            position: self.position,
            config: self.config.clone(),
            seed: Some(self.config.seed),
            run: self.run_keys.clone(),
        };
        let _ = std::fs::remove_dir_all(&final_dir);
        atomic_file::write_atomic(&final_dir, |tmp| {
            let io = |e: tch::TchError| std::io::Error::other(e.to_string());
            std::fs::create_dir(tmp)?;
            save_encoder(&self.vs, &self.encoder, &tmp.join("encoder.safetensors")).map_err(std::io::Error::other)?;
            Tensor::write_safetensors(&head, tmp.join("head.safetensors")).map_err(io)?;
            Tensor::write_safetensors(&opt, tmp.join("optimizer.safetensors")).map_err(io)?;
            std::fs::write(tmp.join("state.json"), serde_json::to_vec_pretty(&state).unwrap_or_default())
        })
        .map_err(|e| fail(&final_dir, e.to_string()))?;
        atomic_file::write_bytes_atomic(&dir.join("latest"), name.as_bytes()).map_err(|e| fail(dir, e.to_string()))?;
        self.last_checkpoint = Some(final_dir.clone());
        Ok(final_dir)
    }

    /// Restores a checkpoint directory (or, given the checkpoints directory, the one `latest` names).
    pub fn load_checkpoint(&mut self, path: &Path) -> Result<(), TrainError> {
        let dir = if path.join("latest").is_file() {
            latest_checkpoint(path)
                .map_err(|e| TrainError::Checkpoint { path: path.join("latest"), message: e.to_string() })?
        } else {
            path.to_path_buf()
        };
        let fail = |message: String| TrainError::Checkpoint { path: dir.clone(), message };
        let state: SavedState =
            serde_json::from_slice(&std::fs::read(dir.join("state.json")).map_err(|e| fail(e.to_string()))?)
                .map_err(|e| fail(format!("state.json: {e}")))?;
        let changes = config_changes(&state, &self.config, &self.run_keys);
        if !changes.is_empty() {
            return Err(fail(format!(
                "saved by a run with another training config ({}); resume with the same config, or pass \
                 --allow-config-change {} to resume anyway",
                changes.join("; "),
                changes.iter().filter_map(|c| c.split(':').next()).collect::<Vec<_>>().join(",")
            )));
        }
        load_encoder(&mut self.vs, &self.encoder, &dir.join("encoder.safetensors")).map_err(fail)?;
        let head = Tensor::read_safetensors(dir.join("head.safetensors")).map_err(|e| fail(e.to_string()))?;
        let mut vars = self.vs.variables();
        tch::no_grad(|| -> Result<(), TrainError> {
            for (name, value) in &head {
                let target = vars.get_mut(name).ok_or_else(|| fail(format!("head.safetensors: unknown '{name}'")))?;
                if target.size() != value.size() {
                    return Err(fail(format!("head.safetensors: '{name}' has shape {:?}", value.size())));
                }
                target.copy_(value);
            }
            Ok(())
        })?;
        let opt = Tensor::read_safetensors(dir.join("optimizer.safetensors")).map_err(|e| fail(e.to_string()))?;
        self.optimizer.load_state(&opt).map_err(fail)?;
        self.step = state.step;
        self.epoch = state.epoch;
        self.position = state.position;
        self.last_checkpoint = Some(dir);
        Ok(())
    }
}

/// 0..n shuffled from (seed, epoch): the epoch order of [`Trainer::fit`].
pub fn shuffled(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    order
}

/// The checkpoint directory that `dir/latest` names.
pub fn latest_checkpoint(dir: &Path) -> std::io::Result<PathBuf> {
    Ok(dir.join(std::fs::read_to_string(dir.join("latest"))?.trim()))
}

/// Share of anchors whose most similar other view is their positive.
pub fn contrastive_accuracy(similarity: &Tensor, rows: &AnchorRows) -> f64 {
    correct_anchors(similarity, rows).double_value(&[]) / rows.positive.len() as f64
}

/// How many anchors' most similar other view is their positive: a float32 scalar on the device.
fn correct_anchors(similarity: &Tensor, rows: &AnchorRows) -> Tensor {
    let positive = Tensor::from_slice(&rows.positive).to_device(similarity.device());
    let best = mask_own(similarity, rows).argmax(1, false);
    best.eq_tensor(&positive).to_kind(Kind::Float).sum(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::augment::AugmentConfig;
    use crate::engine::model::Arch;
    use crate::engine::numerics::Precision;

    fn tiny(batch_size: usize, epochs: u64) -> PretrainConfig {
        PretrainConfig {
            arch: Arch::Tiny,
            head_out: 8,
            batch_size,
            epochs,
            input_size: 32,
            base_lr: 1.0,
            warmup_epochs: 1.0,
            seed: 3,
            ..PretrainConfig::default()
        }
    }

    /// Set in the child process of `a_writer_killed_at_random_points_never_damages_the_last_checkpoint`:
    /// the checkpoints directory it writes into.
    const WRITER_ENV: &str = "SIMCLR_TEST_CHECKPOINT_WRITER";

    /// Every weight of the model set to `value`, so that a checkpoint's files tell which step wrote them.
    fn stamp(t: &mut Trainer, value: f64) {
        tch::no_grad(|| {
            for (_, mut v) in t.vs.variables() {
                let _ = v.fill_(value);
            }
        });
    }

    /// A writer process is killed (SIGKILL) at random moments while it writes checkpoints back to back;
    /// after each kill the latest checkpoint loads, is whole (its weights are the ones its step wrote),
    /// never goes back in time, and the next writer resumes from it.
    #[test]
    fn a_writer_killed_at_random_points_never_damages_the_last_checkpoint() {
        if let Ok(dir) = std::env::var(WRITER_ENV) {
            let dir = PathBuf::from(dir);
            let mut t = Trainer::new(tiny(4, 1), 16, Device::Cpu).unwrap();
            if dir.join("latest").is_file() {
                t.load_checkpoint(&dir).unwrap();
            }
            loop {
                t.step += 1;
                let step = t.step as f64;
                stamp(&mut t, step);
                t.save_checkpoint(&dir).unwrap();
            }
        }
        use rand::Rng;
        let dir = tempfile::tempdir().unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut last = 0u64;
        let mut rounds_with_progress = 0;
        // This test's name as the harness knows it (the module path without the crate).
        let module = module_path!().split_once("::").map_or("", |(_, m)| m);
        let test_name = format!("{module}::a_writer_killed_at_random_points_never_damages_the_last_checkpoint");
        for round in 0..12 {
            let mut writer = std::process::Command::new(&exe)
                .args(["--exact", &test_name])
                .args(["--test-threads", "1", "--nocapture"])
                .env(WRITER_ENV, dir.path())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::thread::sleep(std::time::Duration::from_millis(rng.gen_range(300..1500)));
            writer.kill().unwrap();
            writer.wait().unwrap();
            if !dir.path().join("latest").is_file() {
                continue; // killed before its first checkpoint
            }
            let mut t = Trainer::new(tiny(4, 1), 16, Device::Cpu).unwrap();
            t.load_checkpoint(dir.path())
                .unwrap_or_else(|e| panic!("round {round}: the latest checkpoint does not load: {e}"));
            assert!(t.step >= last, "round {round}: went back from step {last} to {}", t.step);
            rounds_with_progress += usize::from(t.step > last);
            last = t.step;
            for (name, v) in t.vs.variables() {
                let wrong = v.ne(t.step as f64).any().int64_value(&[]) != 0;
                assert!(!wrong, "round {round}: '{name}' of step {} holds another step's values", t.step);
            }
        }
        assert!(rounds_with_progress >= 6, "the writer rarely got to write: {rounds_with_progress} rounds");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains(".tmp-"))
            .collect();
        assert!(leftovers.len() <= 2, "half-written checkpoints pile up: {leftovers:?}");
    }

    fn dataset(n: i64) -> Tensor {
        // Smooth blobs, so that crops of one image resemble each other more than other images.
        let base = with_torch_seed(42, || Tensor::rand([n, 1, 4, 4], (Kind::Float, Device::Cpu)));
        base.upsample_bilinear2d([32, 32], false, None, None)
    }

    fn weights(t: &Trainer) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = t.vs.variables().into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn a_resumed_run_ends_with_the_same_weights() {
        tch::set_num_threads(1);
        let data = dataset(16);
        let mut whole = Trainer::new(tiny(4, 2), 16, Device::Cpu).unwrap();
        whole.fit(&data, None, |_| {}).unwrap();
        assert_eq!(whole.step, 8);

        let dir = tempfile::tempdir().unwrap();
        let mut first = Trainer::new(PretrainConfig { max_steps: 5, ..tiny(4, 2) }, 16, Device::Cpu).unwrap();
        first.fit(&data, Some(dir.path()), |_| {}).unwrap();
        assert_eq!((first.step, first.epoch, first.position), (5, 1, 1));
        assert!(dir.path().join("step-00000005/encoder.safetensors").is_file());
        assert_eq!(std::fs::read_to_string(dir.path().join("latest")).unwrap(), "step-00000005");

        // A new process: other initial weights, then the checkpoint.
        let mut resumed = Trainer::new(PretrainConfig { seed: 1000, ..tiny(4, 2) }, 16, Device::Cpu).unwrap();
        resumed.config.seed = 3; // the run's seed (augmentations, order); the weights come from the checkpoint
        resumed.load_checkpoint(dir.path()).unwrap();
        resumed.fit(&data, None, |_| {}).unwrap();
        for ((name, a), (_, b)) in weights(&whole).iter().zip(weights(&resumed).iter()) {
            assert!(a.equal(b), "{name} differs after resuming");
        }
    }

    /// One step's weight update (after - before, every trainable variable) and loss, on `world`
    /// loopback ranks sharing the global batch of 8 (synchronised BatchNorm with 2).
    fn one_step(config: PretrainConfig, world: usize) -> (Vec<Tensor>, f64) {
        let group = crate::testing::loopback::tcp_group(world, std::time::Duration::from_secs(30));
        let results = crate::testing::loopback::run(&group, |rank, _| {
            let data = dataset(8);
            let mut t =
                Trainer::distributed(config.clone(), 8 / world, Device::Cpu, Arc::clone(&group.members[rank])).unwrap();
            let per = (8 / world) as i64;
            let before: Vec<Tensor> = weights(&t).into_iter().map(|(_, v)| v.detach().copy()).collect();
            let ids: Vec<u64> = (0..per as u64).map(|i| i + rank as u64 * per as u64).collect();
            let stats = t.train_step(&data.narrow(0, rank as i64 * per, per), &ids).unwrap();
            let after = weights(&t).into_iter().map(|(_, v)| v.detach().copy());
            (before.iter().zip(after).map(|(b, a)| a - b).collect::<Vec<_>>(), stats.loss)
        });
        results.into_iter().next().unwrap()
    }

    /// Gradient buckets summed while the backward runs (1 KB buckets: 7 of them) give exactly the
    /// weights of one all-reduce after the backward, over 3 steps on 2 ranks with synchronised
    /// BatchNorm, whether its backward all-reduces queue between the buckets or the buckets have a
    /// ring of their own. A bucket read before its sum
    /// has arrived, or a gradient copied into its bucket before it is complete, fails it.
    #[test]
    fn gradient_buckets_overlapped_with_the_backward_give_the_weights_of_one_all_reduce() {
        let run = |bucket_mb: f64, own_channel: bool| {
            let group = crate::testing::loopback::tcp_group(2, std::time::Duration::from_secs(30));
            let gradients = crate::testing::loopback::tcp_group(2, std::time::Duration::from_secs(30));
            let config = PretrainConfig { bucket_mb, head_batch_norm: true, ..tiny(4, 3) };
            let results = crate::testing::loopback::run(&group, |rank, _| {
                let data = dataset(12);
                let mut t =
                    Trainer::distributed(config.clone(), 6, Device::Cpu, Arc::clone(&group.members[rank])).unwrap();
                if own_channel {
                    t.use_gradient_collective(Arc::clone(&gradients.members[rank])).unwrap();
                }
                let mut started = Vec::new();
                for step in 0..3i64 {
                    let ids: Vec<u64> = (0..2).map(|i| (step * 4 + rank as i64 * 2 + i) as u64).collect();
                    t.train_step(&data.narrow(0, step * 4 + rank as i64 * 2, 2), &ids).unwrap();
                    let r = t.reducer.as_ref().unwrap();
                    started.push((r.buckets(), r.started_in_backward()));
                }
                (weights(&t), started)
            });
            results.into_iter().next().unwrap()
        };
        let (flat, flat_buckets) = run(0.0, false);
        assert_eq!(flat_buckets, vec![(0, 0); 3]);
        // One queue for every collective, and the buckets on a channel of their own.
        for own_channel in [false, true] {
            let (bucketed, buckets) = run(0.001, own_channel);
            // Every step starts buckets inside the backward.
            for &(n, started) in &buckets {
                assert!(n >= 5 && started > 0 && started <= n, "{buckets:?}");
            }
            for ((name, a), (_, b)) in flat.iter().zip(&bucketed) {
                assert!(a.equal(b), "own channel {own_channel}, {name}: {}", (a - b).abs().max().double_value(&[]));
            }
        }
    }

    /// The largest relative difference of any variable's update, against that update's norm.
    fn update_difference(a: &[Tensor], b: &[Tensor]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(a, b)| {
                let scale = b.norm().double_value(&[]);
                if scale == 0.0 {
                    a.norm().double_value(&[])
                } else {
                    (a - b).norm().double_value(&[]) / scale
                }
            })
            .fold(0.0, f64::max)
    }

    /// bf16 autocast against float32, one step from the same weights and views, in one process and
    /// over 2 ranks (synchronised BatchNorm's float32 arithmetic on bf16 activations). bf16 keeps 8
    /// significant bits (unit roundoff u = 2^-9): each convolution or product rounds its two inputs,
    /// so an activation after L such layers is off by at most about 2Lu relative, and its gradient,
    /// which passes the same L layers back, by about 4Lu. The tiny encoder and head have L = 11 in
    /// series (the stem, 4 basic blocks of 2 convolutions, 2 linear layers): the test allows 2Lu =
    /// 0.043 for the loss and 4Lu = 0.086 for the update.
    #[test]
    fn a_bf16_step_agrees_with_the_fp32_step_within_bf16_rounding() {
        tch::set_num_threads(1);
        let u = 2f64.powi(-9);
        let layers = 11.0;
        for world in [1, 2] {
            let config = |precision| PretrainConfig { precision, augment: AugmentConfig::disabled(), ..tiny(8, 1) };
            let (exact, loss) = one_step(config(Precision::Fp32), world);
            let (bf16, bf16_loss) = one_step(config(Precision::Bf16), world);
            let loss_error = (bf16_loss - loss).abs() / loss.abs();
            let update_error = update_difference(&bf16, &exact);
            assert!(loss_error > 0.0, "bf16 autocast changed nothing: is it applied?");
            assert!(loss_error <= 2.0 * layers * u, "{world} rank(s): loss {bf16_loss} vs {loss} ({loss_error:.2e})");
            assert!(update_error <= 4.0 * layers * u, "{world} rank(s): updates differ by {update_error:.2e}");
            eprintln!("{world} rank(s): bf16 against fp32: loss {loss_error:.2e}, update {update_error:.2e}");
        }
    }

    /// Channels-last weights and activations give the contiguous layout's update (the same arithmetic
    /// in another memory order: float summation order only).
    #[test]
    fn a_channels_last_step_equals_the_contiguous_step() {
        tch::set_num_threads(1);
        for world in [1, 2] {
            let config = |channels_last| PretrainConfig {
                channels_last: Some(channels_last),
                augment: AugmentConfig::disabled(),
                ..tiny(8, 1)
            };
            let (plain, loss) = one_step(config(false), world);
            let (last, last_loss) = one_step(config(true), world);
            assert!((last_loss - loss).abs() <= 1e-5 * loss.abs(), "{last_loss} vs {loss}");
            let error = update_difference(&last, &plain);
            assert!(error <= 1e-4, "{world} rank(s): updates differ by {error:.2e}");
        }
        let t = Trainer::new(PretrainConfig { channels_last: Some(true), ..tiny(8, 1) }, 8, Device::Cpu).unwrap();
        let convs: Vec<_> = weights(&t).into_iter().filter(|(_, v)| v.dim() == 4).collect();
        assert!(!convs.is_empty() && convs.iter().all(|(_, v)| crate::engine::numerics::is_channels_last(v)));
    }

    /// A projection head with BatchNorm (1-dimensional, synchronised like the encoder's) gives 2 ranks
    /// the update of one process holding the batch.
    #[test]
    fn a_head_with_batch_norm_steps_alike_on_one_and_two_ranks() {
        tch::set_num_threads(1);
        let config =
            PretrainConfig { head_batch_norm: true, head_layers: 3, augment: AugmentConfig::disabled(), ..tiny(8, 1) };
        let (one, loss_one) = one_step(config.clone(), 1);
        let (two, loss_two) = one_step(config, 2);
        assert!((loss_one - loss_two).abs() <= 1e-5 * loss_one.abs(), "{loss_one} vs {loss_two}");
        let error = update_difference(&two, &one);
        assert!(error <= 1e-3, "updates differ by {error:.2e}");
    }

    /// BatchNorm groups (`pretrain.bn_group_size`): 4 ranks in groups of 2 take the step of 2 ranks with
    /// per-rank BatchNorm over the same images (each group holds what one of those ranks holds): the
    /// same loss and update up to float summation order, far from global synchronised BatchNorm's.
    /// Groups of the world's size are synchronised BatchNorm and groups of one are per-rank BatchNorm,
    /// exactly.
    #[test]
    fn batch_norm_groups_of_two_on_four_ranks_step_as_two_ranks_with_their_own_statistics() {
        tch::set_num_threads(1);
        let base =
            PretrainConfig { head_batch_norm: true, head_layers: 3, augment: AugmentConfig::disabled(), ..tiny(8, 1) };
        let (grouped, loss_grouped) = one_step(PretrainConfig { bn_group_size: 2, ..base.clone() }, 4);
        let (local, loss_local) = one_step(PretrainConfig { bn: BnMode::Local, ..base.clone() }, 2);
        assert!((loss_grouped - loss_local).abs() <= 1e-5 * loss_local.abs(), "{loss_grouped} vs {loss_local}");
        let error = update_difference(&grouped, &local);
        let (global, _) = one_step(base.clone(), 4);
        let global_error = update_difference(&global, &local);
        eprintln!("update against 2 ranks with per-rank BatchNorm: groups of 2 {error:.2e}, global {global_error:.2e}");
        assert!(error <= 1e-3 && global_error > 10.0 * error, "groups {error:.2e}, global {global_error:.2e}");
        let exact = |a: &[Tensor], b: &[Tensor]| a.iter().zip(b).all(|(x, y)| x.equal(y));
        let (whole, _) = one_step(PretrainConfig { bn_group_size: 4, ..base.clone() }, 4);
        assert!(exact(&whole, &global), "groups of the world's size are synchronised BatchNorm");
        let (ones, _) = one_step(PretrainConfig { bn_group_size: 1, ..base.clone() }, 2);
        assert!(exact(&ones, &local), "groups of one are per-rank BatchNorm");
        let solo = Trainer::distributed(PretrainConfig { bn_group_size: 3, ..base }, 8, Device::Cpu, Arc::new(Solo));
        assert!(solo.is_ok(), "a world of one has no groups to form");
    }

    /// Precision and layout are free keys: a checkpoint written under bf16 with channels-last loads
    /// under fp32 contiguous, and the reverse, with the weights as saved.
    #[test]
    fn a_checkpoint_crosses_precisions_and_layouts() {
        let data = dataset(16);
        for (write, read) in [(Precision::Bf16, Precision::Fp32), (Precision::Fp32, Precision::Bf16)] {
            let dir = tempfile::tempdir().unwrap();
            let written =
                PretrainConfig { precision: write, channels_last: Some(write == Precision::Bf16), ..tiny(4, 2) };
            let mut first = Trainer::new(PretrainConfig { max_steps: 2, ..written }, 16, Device::Cpu).unwrap();
            first.fit(&data, Some(dir.path()), |_| {}).unwrap();
            let read = PretrainConfig { precision: read, channels_last: Some(read == Precision::Bf16), ..tiny(4, 2) };
            let mut resumed = Trainer::new(read, 16, Device::Cpu).unwrap();
            resumed.load_checkpoint(dir.path()).unwrap();
            for ((name, a), (_, b)) in weights(&first).iter().zip(weights(&resumed).iter()) {
                assert!(a.equal(b), "{name} differs after loading under {:?}", resumed.config.precision);
            }
            resumed.fit(&data, None, |_| {}).unwrap();
        }
    }

    #[test]
    fn resuming_under_another_training_config_is_refused_naming_the_keys() {
        let data = dataset(16);
        let dir = tempfile::tempdir().unwrap();
        let mut first = Trainer::new(PretrainConfig { max_steps: 2, ..tiny(4, 2) }, 16, Device::Cpu).unwrap();
        first.run_keys = serde_json::json!({ "data.split_seed": 0 });
        first.fit(&data, Some(dir.path()), |_| {}).unwrap();
        let resume = |config: PretrainConfig, run: serde_json::Value| {
            let mut t = Trainer::new(config, 16, Device::Cpu).unwrap();
            t.run_keys = run;
            t.load_checkpoint(dir.path()).map_err(|e| e.to_string())
        };
        let same = serde_json::json!({ "data.split_seed": 0 });
        // The same config (the step limit and checkpoint interval are free to change) resumes.
        resume(PretrainConfig { max_steps: 0, checkpoint_every: 1, ..tiny(4, 2) }, same.clone()).unwrap();
        let e = resume(PretrainConfig { temperature: 0.2, epochs: 3, ..tiny(4, 2) }, same.clone()).unwrap_err();
        assert!(e.contains("pretrain.temperature: 0.1 in the checkpoint, 0.2 now"), "{e}");
        assert!(
            e.contains("pretrain.epochs") && e.contains("--allow-config-change pretrain.epochs,pretrain.temperature"),
            "{e}"
        );
        let e = resume(PretrainConfig { seed: 4, ..tiny(4, 2) }, same.clone()).unwrap_err();
        assert!(e.contains("job.seed: 3 in the checkpoint, 4 now"), "{e}");
        let e = resume(tiny(4, 2), serde_json::json!({ "data.split_seed": 1 })).unwrap_err();
        assert!(e.contains("data.split_seed"), "{e}");
        let e = resume(PretrainConfig { augment: AugmentConfig::simclr(), ..tiny(4, 2) }, same.clone()).unwrap_err();
        assert!(e.contains("pretrain.augment.preset"), "{e}");
        // Allowed keys pass.
        let allowed = vec!["pretrain.temperature".to_string(), "pretrain.epochs".to_string()];
        resume(PretrainConfig { temperature: 0.2, epochs: 3, allow_config_change: allowed, ..tiny(4, 2) }, same)
            .unwrap();
    }

    #[test]
    fn ranks_that_would_start_from_different_weights_are_named() {
        let group = crate::testing::loopback::tcp_group(3, std::time::Duration::from_secs(20));
        let results = crate::testing::loopback::run(&group, |rank, _| {
            let t = Trainer::distributed(tiny(6, 1), 8, Device::Cpu, Arc::clone(&group.members[rank])).unwrap();
            let same = t.check_same_start().map_err(|e| e.to_string());
            if rank == 2 {
                tch::no_grad(|| {
                    let (_, mut v) = t.vs.variables().into_iter().next().unwrap();
                    let _ = v.g_add_scalar_(1e-3);
                });
            }
            (same, t.check_same_start().map_err(|e| e.to_string()))
        });
        for (same, different) in results {
            assert_eq!(same, Ok(()));
            let e = different.unwrap_err();
            assert!(e.contains("rank 2 at step 0") && !e.contains("but rank 1"), "{e}");
        }
    }

    #[test]
    fn fit_with_views_prefetched_equals_plain_steps() {
        let data = dataset(12);
        let mut fitted = Trainer::new(tiny(4, 2), 12, Device::Cpu).unwrap();
        fitted.fit(&data, None, |_| {}).unwrap();
        let mut stepped = Trainer::new(tiny(4, 2), 12, Device::Cpu).unwrap();
        while stepped.step < stepped.total_steps() {
            let order = shuffled(12, stepped.config.seed, stepped.epoch);
            let batch: Vec<i64> =
                order[stepped.position * 4..stepped.position * 4 + 4].iter().map(|&i| i as i64).collect();
            let ids: Vec<u64> = batch.iter().map(|&i| i as u64).collect();
            stepped.train_step(&data.index_select(0, &Tensor::from_slice(&batch)), &ids).unwrap();
        }
        assert_eq!(fitted.step, 6);
        for ((name, a), (_, b)) in weights(&fitted).iter().zip(weights(&stepped).iter()) {
            assert!(a.equal(b), "{name} differs");
        }
    }

    /// Reading the loss back every 4 steps (as on CUDA) gives the monitor the same steps, in order,
    /// with the same values, and the same weights, as reading every step.
    #[test]
    fn deferred_read_back_reports_every_step_with_the_same_values() {
        let data = dataset(12);
        let run = |every: u64| {
            let mut t = Trainer::new(tiny(4, 3), 12, Device::Cpu).unwrap();
            t.read_back_every = every;
            let mut seen = Vec::new();
            t.fit(&data, None, |s| seen.push((s.step, s.epoch, s.loss, s.contrastive_accuracy, s.lr))).unwrap();
            (seen, weights(&t))
        };
        let (each, weights_each) = run(1);
        let (deferred, weights_deferred) = run(4);
        assert_eq!(each.len(), 9);
        assert_eq!(each, deferred);
        for ((name, a), (_, b)) in weights_each.iter().zip(weights_deferred.iter()) {
            assert!(a.equal(b), "{name} differs");
        }
    }

    /// A non-finite loss is caught at the next read-back, naming its step; since checkpoints are
    /// written only after a read-back, none holds weights it reached.
    #[test]
    fn a_non_finite_loss_stops_the_run_before_any_checkpoint_holds_its_weights() {
        let data = dataset(16);
        // One image is NaN: the first batch that holds it gives a NaN loss.
        let _ = data.get(5).fill_(f64::NAN);
        let dir = tempfile::tempdir().unwrap();
        let mut t = Trainer::new(PretrainConfig { checkpoint_every: 3, ..tiny(4, 3) }, 16, Device::Cpu).unwrap();
        t.read_back_every = 100;
        let mut seen = Vec::new();
        let err = t.fit(&data, Some(dir.path()), |s| seen.push(s.step)).unwrap_err();
        let TrainError::NonFinite { step, loss, .. } = err else { panic!("{err}") };
        assert!(loss.is_nan());
        assert_eq!(seen, (1..=step).collect::<Vec<_>>(), "the monitor saw every step before the bad one");
        if let Ok(latest) = latest_checkpoint(dir.path()) {
            let mut resumed = Trainer::new(tiny(4, 3), 16, Device::Cpu).unwrap();
            resumed.load_checkpoint(&latest).unwrap();
            assert!(resumed.step <= step, "checkpoint at step {} after the bad step {step}", resumed.step);
            for (name, v) in weights(&resumed) {
                assert!(v.isfinite().all().int64_value(&[]) == 1, "{name} is not finite in the checkpoint");
            }
        }
    }

    #[test]
    fn the_loss_falls_and_the_monitor_reports_every_step() {
        let data = dataset(32);
        // Mild augmentations, so that a model of a few thousand parameters learns in a few steps.
        let augment = AugmentConfig {
            crop_scale: (0.7, 1.0),
            rotation_degrees: 0.0,
            blur_p: 0.0,
            jitter_strength: 0.2,
            ..AugmentConfig::simclr()
        };
        let config = PretrainConfig {
            optimizer: OptimizerName::Adamw,
            base_lr: 0.01,
            lr_scaling: LrScalingName::None,
            warmup_epochs: 0.0,
            augment,
            ..tiny(16, 15)
        };
        let mut trainer = Trainer::new(config, 32, Device::Cpu).unwrap();
        let mut seen = Vec::new();
        trainer.fit(&data, None, |s| seen.push(*s)).unwrap();
        assert_eq!(seen.len(), 30);
        assert!(seen.iter().all(|s| s.loss.is_finite() && (0.0..=1.0).contains(&s.contrastive_accuracy)));
        let mean = |s: &[StepStats]| s.iter().map(|x| x.loss).sum::<f64>() / s.len() as f64;
        let (early, late) = (mean(&seen[..10]), mean(&seen[20..]));
        assert!(late < early - 0.05, "loss {early} -> {late}");
    }

    #[test]
    fn a_non_finite_loss_names_the_step_and_the_last_checkpoint() {
        let data = dataset(8);
        let dir = tempfile::tempdir().unwrap();
        let mut trainer = Trainer::new(PretrainConfig { max_steps: 1, ..tiny(4, 5) }, 8, Device::Cpu).unwrap();
        trainer.fit(&data, Some(dir.path()), |_| {}).unwrap();
        let poisoned = data.narrow(0, 0, 4).fill_(f64::NAN);
        let err = trainer.train_step(&poisoned, &[0, 1, 2, 3]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("at step 1") && text.contains("step-00000001"), "{text}");
    }

    #[test]
    fn contrastive_accuracy_counts_top_matches() {
        // Anchor 0's best other key is 2 (its positive), anchor 1's is 0 (not its positive 3).
        let sim = Tensor::from_slice(&[
            1.0, 0.2, 0.9, 0.1, //
            0.8, 1.0, 0.1, 0.3, //
            0.9, 0.1, 1.0, 0.2, //
            0.1, 0.7, 0.2, 1.0,
        ])
        .view([4, 4]);
        let acc = contrastive_accuracy(&sim, &AnchorRows::whole_batch(2));
        assert!((acc - 0.75).abs() < 1e-12, "{acc}");
    }
}
