//! The pretrain phase: SimCLR over the whole cluster. Every rank builds the same model from the job's
//! seed (or from `pretrain.init_weights`, or resumes from the run directory's latest checkpoint, refused
//! if its training config differs), checks that every rank holds the same state, then steps in
//! lockstep: each epoch it asks the coordinator for its slice of every global batch of the epoch's
//! order (one order from (seed, epoch), whatever the world size), reads the images from the decode cache
//! (decoding any it has not seen yet), and trains on its slice with the exact distributed NT-Xent (see
//! `train`), synchronised BatchNorm by default.
//!
//! Rank 0 writes the checkpoints into `<run dir>/checkpoints/` and the final encoder (torchvision names)
//! to `<run dir>/encoder.safetensors`, and tells the coordinator, which records them. Progress (loss,
//! contrastive accuracy, learning rate, images/s) goes to the coordinator every few seconds; the phase
//! result splits the time into data loading, communication (all of it, and the part the step waited
//! for) and compute.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use simclr_data::cache::{fnv1a, DecodeCache};
use simclr_data::pixels::DecodeOptions;
use simclr_proto::wire;
use tch::Tensor;
use tokio::sync::mpsc;

use crate::comm::{Collective, Timed};
use crate::engine::model::load_encoder;
use crate::engine::model::save_encoder;
use crate::engine::stream::{SlotReader, StreamedEpoch};
use crate::engine::train::{latest_checkpoint, EpochSource, StepStats, TrainError, Trainer};
use crate::phase::assignments::{cache_key, Purpose};
use crate::phase::monitor::{Monitor, MonitorPoint};
use crate::phase::{PhaseContext, PhaseError, PhaseOutput};

const PHASE: &str = "pretrain";
const REPORT_EVERY: Duration = Duration::from_secs(2);

/// What the training thread tells the async side.
enum Event {
    /// Training begins; `total` steps in all (including those of a run resumed from).
    Start {
        total: u64,
    },
    Step(StepStats),
    Checkpoint {
        step: u64,
        path: PathBuf,
    },
    /// A look of the kNN monitor (`[pretrain.monitor]`).
    Monitor(MonitorPoint),
}

pub async fn run(ctx: &PhaseContext) -> Result<PhaseOutput, PhaseError> {
    let config = ctx.config.pretrain.clone();
    let mut output = PhaseOutput::default();
    if !config.enabled {
        tracing::info!("pretraining disabled (pretrain.enabled = false)");
        output.metrics.insert("skipped".into(), 1.0);
        return Ok(output);
    }
    let run_dir =
        ctx.config.job.run_dir.clone().ok_or_else(|| {
            PhaseError::permanent("the coordinator sent no job.run_dir; checkpoints have nowhere to go")
        })?;
    let first = ctx.assignments().fetch(Purpose::Pretrain { epoch: 0 }).await?;
    if first.data_root.is_empty() {
        // Only jobs built in code (membership tests) have no dataset; every launcher gives one.
        tracing::info!("no dataset in this job: nothing to pretrain");
        output.metrics.insert("skipped".into(), 1.0);
        return Ok(output);
    }
    let collective = ctx.collective(PHASE).await?;
    let timed = Arc::new(Timed::new(collective));
    let gradients = ctx.gradient_collective(PHASE).await?.map(|c| Arc::new(Timed::new(c)));
    let (events, mut rx) = mpsc::unbounded_channel();
    let job = TrainJob {
        rank: ctx.rank,
        assignments: ctx.assignments(),
        run_dir,
        per_rank: first.train.len(),
        device: ctx.device,
        collective: Arc::clone(&timed),
        gradients: gradients.clone(),
        config,
        cancel: ctx.interrupt.clone(),
        runtime: tokio::runtime::Handle::current(),
        events,
        issues: Arc::new(Mutex::new(Vec::new())),
        run_keys: run_keys(&ctx.config),
        decode: DecodeOptions::of(&ctx.config.data),
        bad: Arc::default(),
        data_seconds: Arc::default(),
        slot_labels: Arc::default(),
    };
    let issues = Arc::clone(&job.issues);
    let comm_s = move || timed.seconds() + gradients.as_ref().map_or(0.0, |g| g.seconds());
    let mut work = tokio::task::spawn_blocking(move || job.train());
    let mut last_report = Instant::now() - REPORT_EVERY;
    let mut latest: Option<StepStats> = None;
    let mut total = 0;
    let result = loop {
        tokio::select! {
            r = &mut work => break r.map_err(|e| PhaseError::permanent(format!("training thread failed: {e}")))?,
            Some(event) = rx.recv() => match event {
                Event::Start { total: t } => total = t,
                Event::Step(stats) => {
                    latest = Some(stats);
                    if last_report.elapsed() >= REPORT_EVERY {
                        last_report = Instant::now();
                        report(ctx, &stats, total, None, comm_s()).await;
                    }
                }
                Event::Checkpoint { step, path } => {
                    if let Some(stats) = &latest {
                        report(ctx, stats, total, Some(&path), comm_s()).await;
                    } else {
                        tracing::info!(step, path = %path.display(), "checkpoint");
                    }
                }
                Event::Monitor(point) => report_monitor(ctx, &point, total).await,
            },
        }
    };
    // Events still queued when the thread ended: the last steps and the final checkpoint.
    while let Ok(event) = rx.try_recv() {
        match event {
            Event::Start { total: t } => total = t,
            Event::Step(stats) => latest = Some(stats),
            Event::Checkpoint { path, .. } => {
                if let Some(stats) = &latest {
                    report(ctx, stats, total, Some(&path), comm_s()).await;
                }
            }
            Event::Monitor(point) => report_monitor(ctx, &point, total).await,
        }
    }
    output.issues = std::mem::take(&mut *issues.lock().unwrap_or_else(|p| p.into_inner()));
    output.metrics = result?;
    Ok(output)
}

/// The data settings a pretraining run's course depends on (which images, in which order, at which
/// size), compared when a run resumes from a checkpoint.
fn run_keys(config: &simclr_common::JobConfig) -> serde_json::Value {
    let d = &config.data;
    serde_json::json!({
        "data.path": d.path.as_ref().map(|p| p.display().to_string()),
        "data.synthetic_studies": d.synthetic_studies,
        "data.image_size": config.image_size(),
        "data.test_fraction": d.test_fraction,
        "data.validation_fraction": d.validation_fraction,
        "data.split_seed": d.split_seed,
        "data.shard_policy": d.shard_policy,
    })
}

/// Whether a restart from the last checkpoint may cure a training failure.
impl From<TrainError> for PhaseError {
    fn from(e: TrainError) -> PhaseError {
        match &e {
            // A peer that died or froze cuts the collectives off; a restart from the checkpoint cures it.
            TrainError::Collective(c) => PhaseError::from(c.clone()),
            TrainError::Interrupted(_) | TrainError::Data { retryable: true, .. } => {
                PhaseError::retryable(e.to_string())
            }
            // The same data and weights diverge again, and a configuration or a checkpoint that cannot
            // be used stays so.
            TrainError::NonFinite { .. }
            | TrainError::Checkpoint { .. }
            | TrainError::Config(_)
            | TrainError::Data { retryable: false, .. } => PhaseError::permanent(e.to_string()),
        }
    }
}

/// Rank 0's progress report: the step's metrics and `comm_s`, the seconds this rank has spent in
/// collectives so far.
async fn report(ctx: &PhaseContext, stats: &StepStats, total: u64, checkpoint: Option<&Path>, comm_s: f64) {
    let metrics = [
        ("loss", stats.loss),
        ("contrastive_accuracy", stats.contrastive_accuracy),
        ("lr", stats.lr),
        ("images_per_s", stats.images_per_second),
        ("epoch", stats.epoch as f64),
        ("comm_s", comm_s),
    ];
    let request = wire::ReportProgressRequest {
        rank: ctx.rank,
        instance_id: ctx.instance_id.clone(),
        phase: PHASE.into(),
        step: stats.step,
        total,
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        checkpoint: checkpoint.map(|p| p.display().to_string()).unwrap_or_default(),
        ..Default::default()
    };
    if let Err(e) = ctx.coordinator.clone().report_progress(request).await {
        tracing::debug!(error = %e.message(), "progress report failed");
    }
}

/// A look of the kNN monitor, reported by rank 0: the progress line, TensorBoard.
async fn report_monitor(ctx: &PhaseContext, point: &MonitorPoint, total: u64) {
    if ctx.rank != 0 {
        return;
    }
    let metrics = [
        ("knn_auc", point.knn_auc),
        ("knn_accuracy", point.knn_accuracy),
        ("online_auc", point.online_auc),
        ("online_accuracy", point.online_accuracy),
        ("monitor_epoch", (point.epoch + 1) as f64),
    ];
    let request = wire::ReportProgressRequest {
        rank: ctx.rank,
        instance_id: ctx.instance_id.clone(),
        phase: PHASE.into(),
        step: point.step,
        total,
        metrics: metrics.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        ..Default::default()
    };
    if let Err(e) = ctx.coordinator.clone().report_progress(request).await {
        tracing::debug!(error = %e.message(), "monitor report failed");
    }
}

struct TrainJob {
    rank: u32,
    assignments: crate::phase::assignments::Assignments,
    run_dir: PathBuf,
    per_rank: usize,
    device: tch::Device,
    collective: Arc<Timed>,
    /// The gradient buckets' own channel, where the backend has one.
    gradients: Option<Arc<Timed>>,
    config: simclr_common::pretrain::PretrainSection,
    cancel: tokio_util::sync::CancellationToken,
    runtime: tokio::runtime::Handle,
    events: mpsc::UnboundedSender<Event>,
    issues: Arc<Mutex<Vec<(String, String)>>>,
    /// The data keys the epoch order depends on (`Trainer::run_keys`).
    run_keys: serde_json::Value,
    decode: DecodeOptions,
    /// Images that failed to decode in this run (see `CacheReader::bad`).
    bad: Arc<Mutex<std::collections::HashMap<String, String>>>,
    /// Seconds the step has waited for its data (assignments and batches).
    data_seconds: Arc<Mutex<f64>>,
    /// Each loaded epoch's first-target label per slot of this rank (NaN: none), for the online
    /// classifier of the monitor.
    slot_labels: Arc<Mutex<std::collections::BTreeMap<u64, Vec<f32>>>>,
}

impl TrainJob {
    /// Runs on a blocking thread: the whole training loop, returning the phase's metrics.
    fn train(self) -> Result<std::collections::BTreeMap<String, f64>, PhaseError> {
        let started = Instant::now();
        let collective: Arc<dyn Collective> = Arc::clone(&self.collective) as _;
        // Every rank must step the same number of times per epoch, or the collectives would pair
        // different steps: check before the first one.
        let counts = collective.all_gather(&Tensor::from_slice(&[self.per_rank as f32]))?;
        let counts = Vec::<f32>::try_from(&counts).map_err(|e| TrainError::Config(e.to_string()))?;
        if counts.iter().any(|&c| c != counts[0]) {
            return Err(PhaseError::permanent(format!(
                "ranks hold epochs of different lengths (slots per rank: {counts:?})"
            )));
        }
        let mut trainer = Trainer::distributed(self.config.clone(), self.per_rank, self.device, collective)?;
        trainer.run_keys = self.run_keys.clone();
        let checkpoints = self.run_dir.join("checkpoints");
        if checkpoints.join("latest").is_file() {
            trainer.load_checkpoint(&checkpoints)?;
            tracing::info!(step = trainer.step, epoch = trainer.epoch, dir = %checkpoints.display(), "resuming from the latest checkpoint");
        } else if let Some(path) = &self.config.init_weights {
            load_encoder(&mut trainer.vs, &trainer.encoder, path)
                .map_err(|message| TrainError::Checkpoint { path: path.clone(), message })?;
            tracing::info!(path = %path.display(), "encoder initialised from pretrain.init_weights");
        }
        if let Some(g) = &self.gradients {
            trainer.use_gradient_collective(Arc::clone(g) as _)?;
        }
        trainer.check_same_start()?;
        let total = trainer.total_steps();
        let _ = self.events.send(Event::Start { total });
        tracing::info!(
            world_size = self.collective.world_size(),
            images_per_rank = self.per_rank,
            global_batch = self.config.batch_size,
            steps = total,
            arch = ?self.config.arch,
            bn = ?self.config.bn,
            "pretraining"
        );
        let cache = DecodeCache::open(&simclr_data::cache_dir().join("decoded"))
            .map_err(|e| TrainError::Config(format!("decode cache: {e}")))?
            .with_options(self.decode);
        let cache = Arc::new(cache);
        let mut history: Vec<StepStats> = Vec::new();
        let mut last_checkpoint_seen = latest_checkpoint(&checkpoints).ok();
        let rank0 = self.rank == 0;
        let first_step = trainer.step;
        let mut monitor = self.monitor(&trainer)?;
        let monitor_csv = self.run_dir.join("monitor.csv");
        let mut monitor_seconds = 0.0;
        let online_seconds = Mutex::new(0.0);
        let mut look = |monitor: &mut Monitor, trainer: &Trainer, epoch: u64| -> Result<(), TrainError> {
            let t = Instant::now();
            let point =
                monitor.look(&trainer.encoder, self.collective.as_ref(), epoch, trainer.step).map_err(|message| {
                    TrainError::Data { retryable: true, message: format!("pretrain.monitor: {message}") }
                })?;
            monitor_seconds += t.elapsed().as_secs_f64();
            tracing::info!(
                epoch = epoch + 1,
                step = point.step,
                knn_auc = point.knn_auc,
                knn_accuracy = point.knn_accuracy,
                online_auc = point.online_auc,
                online_accuracy = point.online_accuracy,
                "monitor"
            );
            let _ = self.events.send(Event::Monitor(point));
            if rank0 {
                if let Err(e) = monitor.write_csv(&monitor_csv) {
                    tracing::warn!(path = %monitor_csv.display(), "cannot write the monitor's table: {e}");
                }
            }
            Ok(())
        };
        trainer.fit_epochs(
            |epoch| {
                let t = Instant::now();
                let data = self
                    .epoch_data(&cache, epoch)
                    .map_err(|e| TrainError::Data { retryable: e.is_retryable(), message: e.message });
                *self.data_seconds.lock().unwrap_or_else(|p| p.into_inner()) += t.elapsed().as_secs_f64();
                data
            },
            rank0.then_some(checkpoints.as_path()),
            |stats| {
                if self.cancel.is_cancelled() {
                    return Err(TrainError::Interrupted(format!("the worker was told to stop at step {}", stats.step)));
                }
                history.push(*stats);
                let _ = self.events.send(Event::Step(*stats));
                // A checkpoint written after the previous step (the trainer writes them after the
                // monitor has seen the step) is announced now.
                if rank0 {
                    self.announce_checkpoint(&checkpoints, stats.step - 1, &mut last_checkpoint_seen);
                }
                Ok(())
            },
            |trainer| {
                let Some(m) = monitor.as_mut() else { return Ok(()) };
                let t = Instant::now();
                // The step just done: the last of the previous epoch where the position is back at 0.
                let (epoch, position) = match trainer.position {
                    0 => (trainer.epoch - 1, trainer.steps_per_epoch as usize - 1),
                    p => (trainer.epoch, p - 1),
                };
                if let Some(features) = &trainer.last_features {
                    let b = trainer.local_batch;
                    let labels: Vec<f32> = self
                        .slot_labels
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&epoch)
                        .and_then(|l| l.get(position * b..(position + 1) * b).map(<[f32]>::to_vec))
                        .unwrap_or_else(|| vec![f32::NAN; b]);
                    m.step_online(features, &labels, self.collective.as_ref()).map_err(|message| TrainError::Data {
                        retryable: true,
                        message: format!("pretrain.monitor: {message}"),
                    })?;
                }
                *online_seconds.lock().unwrap_or_else(|p| p.into_inner()) += t.elapsed().as_secs_f64();
                match trainer.position {
                    0 if m.due(epoch, trainer.step >= total) => look(m, trainer, epoch),
                    _ => Ok(()),
                }
            },
        )?;
        // A run cut short inside an epoch (pretrain.max_steps) is looked at where it stopped.
        if let Some(m) = monitor.as_mut() {
            if m.history.last().is_none_or(|p| p.step != trainer.step) && trainer.step > first_step {
                look(m, &trainer, trainer.epoch)?;
            }
        }
        let last_look = monitor.as_ref().and_then(|m| m.history.last().copied());
        if rank0 {
            self.announce_checkpoint(&checkpoints, trainer.step, &mut last_checkpoint_seen);
            let path = self.run_dir.join("encoder.safetensors");
            save_encoder(&trainer.vs, &trainer.encoder, &path)
                .map_err(|message| TrainError::Checkpoint { path: path.clone(), message })?;
            tracing::info!(path = %path.display(), "encoder written");
        }
        let seconds = started.elapsed().as_secs_f64();
        let data = *self.data_seconds.lock().unwrap_or_else(|p| p.into_inner());
        let comm = self.collective.seconds() + self.gradients.as_ref().map_or(0.0, |g| g.seconds());
        // The part of it the training thread waited for (the rest ran beside the backward).
        let exposed = trainer.exposed_communication_seconds().unwrap_or(comm);
        // The last epoch's steps (at most 20) summarise where training ended.
        let tail = &history[history.len().saturating_sub(20)..];
        let mean = |f: fn(&StepStats) -> f64| tail.iter().map(f).sum::<f64>() / tail.len().max(1) as f64;
        let steps = trainer.step - first_step;
        let images = steps as f64 * self.config.batch_size as f64;
        let mut m = std::collections::BTreeMap::new();
        for (k, v) in [
            ("steps", trainer.step as f64),
            ("steps_this_run", steps as f64),
            ("epochs", trainer.epoch as f64),
            ("world_size", self.collective.world_size() as f64),
            ("global_batch", self.config.batch_size as f64),
            ("final_loss", mean(|s| s.loss)),
            ("final_contrastive_accuracy", mean(|s| s.contrastive_accuracy)),
            ("first_loss", history.first().map(|s| s.loss).unwrap_or(f64::NAN)),
            // This rank's share of the global batch per second; the cluster's is their sum.
            ("images_per_s", images / self.collective.world_size() as f64 / seconds.max(1e-9)),
            ("cluster_images_per_s", images / seconds.max(1e-9)),
            ("seconds", seconds),
            ("data_seconds", data),
            ("communication_seconds", comm),
            // Of which the gradient buckets on their own channel (0 where they share the step's).
            ("gradient_communication_seconds", self.gradients.as_ref().map_or(0.0, |g| g.seconds())),
            ("exposed_communication_seconds", exposed),
            ("compute_seconds", (seconds - data - exposed).max(0.0)),
        ] {
            m.insert(k.to_string(), v);
        }
        if let Some(p) = last_look {
            m.insert("knn_auc".into(), p.knn_auc);
            m.insert("knn_accuracy".into(), p.knn_accuracy);
            m.insert("online_auc".into(), p.online_auc);
            m.insert("online_accuracy".into(), p.online_accuracy);
            let online = *online_seconds.lock().unwrap_or_else(|p| p.into_inner());
            m.insert("monitor_seconds".into(), monitor_seconds + online);
        }
        Ok(m)
    }

    /// The kNN monitor, when it is on and the job has labelled images (see [`Monitor::load`]).
    fn monitor(&self, trainer: &Trainer) -> Result<Option<Monitor>, PhaseError> {
        if self.config.monitor.every_epochs == 0 {
            return Ok(None);
        }
        let assignment = self.runtime.block_on(self.assignments.fetch(Purpose::Probe))?;
        let monitor = Monitor::load(
            self.config.monitor,
            &assignment,
            self.decode,
            self.config.input_size,
            self.device,
            self.collective.as_ref(),
        )
        .map_err(|e| PhaseError::retryable(format!("pretrain.monitor: {e}")))?;
        // A resumed run keeps the looks of the epochs it had finished.
        Ok(monitor.map(|m| m.resumed(&self.run_dir.join("monitor.csv"), trainer.epoch)))
    }

    fn announce_checkpoint(&self, dir: &Path, step: u64, seen: &mut Option<PathBuf>) {
        if let Ok(latest) = latest_checkpoint(dir) {
            if seen.as_ref() != Some(&latest) {
                let _ = self.events.send(Event::Checkpoint { step, path: latest.clone() });
                *seen = Some(latest);
            }
        }
    }

    /// This rank's slots of `epoch` (its slice of every global batch, in step order), read from the
    /// decode cache a few batches ahead of the step (decoding any image not there yet); see
    /// [`StreamedEpoch`].
    fn epoch_data(&self, cache: &Arc<DecodeCache>, epoch: u64) -> Result<Box<dyn EpochSource>, PhaseError> {
        let a = self.runtime.block_on(self.assignments.fetch(Purpose::Pretrain { epoch }))?;
        if a.train.len() != self.per_rank {
            return Err(PhaseError::permanent(format!(
                "epoch {epoch}: the coordinator assigned {} slots to this rank, epoch 0 had {}",
                a.train.len(),
                self.per_rank
            )));
        }
        {
            let labels = a.train.iter().map(|r| r.labels.first().copied().unwrap_or(f32::NAN)).collect();
            let mut all = self.slot_labels.lock().unwrap_or_else(|p| p.into_inner());
            all.insert(epoch, labels);
            while all.len() > 3 {
                all.pop_first();
            }
        }
        let reader = CacheReader {
            paired: self.config.positives != simclr_common::pretrain::Positives::Views,
            refs: a.train,
            root: PathBuf::from(&a.data_root),
            image_size: a.image_size,
            cache: Arc::clone(cache),
            bad: Arc::clone(&self.bad),
            issues: Arc::clone(&self.issues),
        };
        let local_batch = self.config.batch_size / self.collective.world_size();
        Ok(Box::new(WaitTimed {
            inner: StreamedEpoch::new(Arc::new(reader), local_batch, PREFETCH_BATCHES, self.device),
            seconds: Arc::clone(&self.data_seconds),
        }))
    }
}

/// Batches read ahead of the step, per rank.
const PREFETCH_BATCHES: usize = 3;

/// This rank's slots of one epoch in the decode cache.
struct CacheReader {
    refs: Vec<wire::ImageRef>,
    /// Each slot also reads its partner image (`pretrain.positives` other than "views").
    paired: bool,
    root: PathBuf,
    image_size: u32,
    cache: Arc<DecodeCache>,
    /// Images that failed to decode in this run, and why: not decoded again in later epochs.
    bad: Arc<Mutex<std::collections::HashMap<String, String>>>,
    issues: Arc<Mutex<Vec<(String, String)>>>,
}

impl SlotReader for CacheReader {
    fn slots(&self) -> usize {
        self.refs.len()
    }

    fn side(&self) -> usize {
        self.image_size as usize
    }

    fn channels(&self) -> usize {
        if self.paired {
            2
        } else {
            1
        }
    }

    fn read(&self, slot: usize) -> Result<Vec<u16>, String> {
        let r = &self.refs[slot];
        let mut pixels = self.read_image(r)?;
        if self.paired {
            // A partner that does not decode is reported once, and the image stands in for it.
            let partner = match r.partner.as_deref() {
                Some(p) if p.path != r.path => self.read_image(p).unwrap_or_else(|reason| {
                    self.report_path(&p.path, &reason);
                    pixels.clone()
                }),
                _ => pixels.clone(),
            };
            pixels.extend(partner);
        }
        Ok(pixels)
    }

    fn id(&self, slot: usize) -> u64 {
        view_id(&self.refs[slot].sop_uid, self.refs[slot].occurrence)
    }

    /// The source image's occurrence `u32::MAX - slot`: no real occurrence count gets near it.
    fn substitute_id(&self, slot: usize, source: usize) -> u64 {
        view_id(&self.refs[source].sop_uid, u32::MAX - slot as u32)
    }

    fn report(&self, slot: usize, reason: &str) {
        self.report_path(&self.refs[slot].path, reason);
    }
}

impl CacheReader {
    /// One image's pixels from the decode cache (decoding it if it is not there yet).
    fn read_image(&self, r: &wire::ImageRef) -> Result<Vec<u16>, String> {
        if let Some(reason) = self.bad.lock().unwrap_or_else(|p| p.into_inner()).get(&r.path) {
            return Err(reason.clone());
        }
        let key = cache_key(r, self.image_size);
        self.cache.get_or_decode_unorm16(&self.root, &key).map(|(pixels, _)| pixels).map_err(|e| {
            let reason = format!("decode: {e}");
            self.bad.lock().unwrap_or_else(|p| p.into_inner()).insert(r.path.clone(), reason.clone());
            reason
        })
    }

    /// Records an unusable file once per image and run, however many epochs meet it.
    fn report_path(&self, path: &str, reason: &str) {
        let mut issues = self.issues.lock().unwrap_or_else(|p| p.into_inner());
        if !issues.iter().any(|(p, _)| p == path) {
            issues.push((path.to_string(), reason.to_string()));
        }
    }
}

/// An epoch source that adds the time the step waits for its batches to `seconds`.
struct WaitTimed<S> {
    inner: S,
    seconds: Arc<Mutex<f64>>,
}

impl<S: EpochSource> EpochSource for WaitTimed<S> {
    fn slots(&self) -> usize {
        self.inner.slots()
    }

    fn batch(&mut self, position: usize, size: usize) -> Result<(Tensor, Vec<u64>), TrainError> {
        let t = Instant::now();
        let batch = self.inner.batch(position, size);
        *self.seconds.lock().unwrap_or_else(|p| p.into_inner()) += t.elapsed().as_secs_f64();
        batch
    }
}

/// The sample id of an image's `occurrence` in an epoch (what its views derive from): the first
/// occurrence's is the SOP Instance UID's hash, every other one's differs, so two occurrences of an image
/// in one batch are two different pairs of views, not copies NT-Xent would have to push apart.
pub(crate) fn view_id(sop_uid: &str, occurrence: u32) -> u64 {
    fnv1a(sop_uid.as_bytes()) ^ u64::from(occurrence).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::comm::CollectiveError;

    #[test]
    fn every_occurrence_of_an_image_gets_views_of_its_own() {
        use crate::engine::augment::two_views;
        use simclr_common::pretrain::AugmentConfig;
        let ids: Vec<u64> = (0..4).map(|k| view_id("1.2.3", k)).chain([view_id("1.2.3", u32::MAX)]).collect();
        let distinct: std::collections::BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
        assert_eq!(view_id("1.2.3", 0), fnv1a(b"1.2.3"));
        // One image twice in a batch: its two occurrences' views differ.
        let image = crate::engine::model::with_torch_seed(5, || {
            Tensor::rand([1, 1, 16, 16], (tch::Kind::Float, tch::Device::Cpu))
        });
        let batch = Tensor::cat(&[&image, &image], 0);
        let (v0, v1) = two_views(&AugmentConfig::cxr(), &batch, &ids[..2], 0, 0, 16);
        for v in [&v0, &v1] {
            let gap = (v.get(0) - v.get(1)).abs().max().double_value(&[]);
            assert!(gap > 1e-3, "identical views of two occurrences ({gap})");
        }
    }

    #[test]
    fn training_failures_are_retryable_only_where_a_restart_may_cure_them() {
        let timeout = CollectiveError::Timeout { op: "all-reduce", peer: 1, addr: "h:1".into(), timeout_ms: 5 };
        for (e, retryable) in [
            (TrainError::Collective(timeout), true),
            (TrainError::Interrupted("stop".into()), true),
            (TrainError::Data { message: "coordinator unreachable".into(), retryable: true }, true),
            (TrainError::Data { message: "no image decodes".into(), retryable: false }, false),
            (TrainError::NonFinite { step: 3, loss: f64::NAN, last_checkpoint: None }, false),
            (TrainError::Checkpoint { path: "c".into(), message: "torn".into() }, false),
            (TrainError::Config("batch".into()), false),
        ] {
            let message = e.to_string();
            assert_eq!(PhaseError::from(e).is_retryable(), retryable, "{message}");
        }
    }
}
