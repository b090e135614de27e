//! The probe phase: the transfer sweep on the frozen encoder.
//!
//! 1. Features, once. Rank 0 loads the encoder (`probe.encoder`, else the run's `encoder.safetensors`)
//!    and broadcasts it, checksum verified on every rank (`features::broadcast_encoder`); the random
//!    baseline encoder is broadcast the same way. Each rank embeds its share of the labelled training,
//!    validation and test images (from the decode cache; BatchNorm in eval mode, no gradient) through
//!    both, and the shares are gathered and sorted by image, so every rank holds every feature row and
//!    label in the same order for any world size.
//! 2. The sweep. The rank asks the coordinator for a task (`NextProbeTask`), trains and evaluates that
//!    probe on the cached features (`probe::run_task`), reports the outcome (`ReportProbeResult`), and
//!    asks again until the coordinator says the sweep is finished. No collectives here: a rank that dies
//!    costs only its running task, which the coordinator hands to another rank.

use std::path::{Path, PathBuf};
use std::time::Instant;

use rayon::prelude::*;
use simclr_common::probe::{EncoderSource, ProbeOutcome, ProbeTask};
use simclr_data::cache::DecodeCache;
use simclr_data::pixels::DecodeOptions;
use simclr_proto::wire;
use tch::{nn, Device, Kind, Tensor};

use crate::comm::{f32s_to_u64, u64_to_f32s, Collective};
use crate::engine::model::{load_encoder, var_store_drawn_on_cpu, with_torch_seed, Encoder, EncoderConfig};
use crate::engine::numerics::{Numerics, Precision};
use crate::phase::assignments::{cache_key, Purpose};
use crate::phase::{PhaseContext, PhaseError, PhaseOutput};
use crate::probe::features::{broadcast_encoder, gather_rows};
use crate::probe::{embed, run_task, FineTuneData, Rows, SweepData, ValidationData, EMBED_BATCH};

const PHASE: &str = "probe";
/// Added to the job's seed for the random baseline encoder's weights, so they differ from the weights
/// pretraining started from.
const RANDOM_ENCODER_SEED: u64 = 0x5eed_0001;

pub async fn run(ctx: &PhaseContext) -> Result<PhaseOutput, PhaseError> {
    let section = ctx.config.probe.clone();
    let mut output = PhaseOutput::default();
    if !section.enabled {
        tracing::info!("probe sweep disabled (probe.enabled = false)");
        output.metrics.insert("skipped".into(), 1.0);
        return Ok(output);
    }
    let assignment = ctx.assignments().fetch(Purpose::Probe).await.map_err(|e| e.context("probe sweep"))?;
    if assignment.data_root.is_empty() {
        tracing::info!("no dataset in this job: nothing to probe");
        output.metrics.insert("skipped".into(), 1.0);
        return Ok(output);
    }
    let encoder_path = match (&section.encoder, &ctx.config.job.run_dir) {
        (Some(path), _) => path.clone(),
        (None, Some(dir)) => dir.join("encoder.safetensors"),
        (None, None) => return Err(PhaseError::permanent("no probe.encoder and no job.run_dir: no encoder to probe")),
    };
    let started = Instant::now();
    let collective = ctx.collective(PHASE).await?;
    let job = FeatureJob {
        rank: ctx.rank,
        assignment,
        encoder_path,
        config: EncoderConfig::of(&ctx.config.pretrain),
        input_size: ctx.config.pretrain.input_size,
        precision: ctx.config.pretrain.precision,
        seed: ctx.config.job.seed,
        random_baseline: section.random_baseline,
        finetune: section.finetune,
        export_dir: ctx.config.job.run_dir.clone(),
        device: ctx.device,
        decode: DecodeOptions::of(&ctx.config.data),
    };
    let (data, mut metrics, issues) = tokio::task::spawn_blocking(move || {
        let result = job.features(collective.as_ref());
        // The ring is closed here: the sweep needs no collectives, so a lost peer cannot stall it.
        drop(collective);
        result
    })
    .await
    .map_err(|e| PhaseError::permanent(format!("feature thread failed: {e}")))??;
    output.issues = issues;
    metrics.insert("feature_seconds".into(), started.elapsed().as_secs_f64());
    tracing::info!(
        train = metrics["train_images"],
        test = metrics["test_images"],
        dim = metrics["feature_dim"],
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "features ready on every rank; sweeping"
    );

    let swept = Instant::now();
    let mut data = data;
    let mut tasks = 0u32;
    loop {
        if ctx.interrupt.is_cancelled() {
            return Err(PhaseError::retryable("the worker was told to stop during the probe sweep"));
        }
        let request = wire::NextProbeTaskRequest { rank: ctx.rank, instance_id: ctx.instance_id.clone() };
        let next = ctx
            .coordinator
            .clone()
            .next_probe_task(request)
            .await
            .map_err(|e| PhaseError::retryable(format!("asking the coordinator for a probe task: {}", e.message())))?
            .into_inner();
        match wire::SweepState::try_from(next.state).unwrap_or(wire::SweepState::Unspecified) {
            wire::SweepState::Task => {}
            wire::SweepState::Wait => continue,
            wire::SweepState::Finished => break,
            wire::SweepState::Unspecified => {
                return Err(PhaseError::permanent(format!("the coordinator answered sweep state {}", next.state)))
            }
        }
        let task: ProbeTask = serde_json::from_str(&next.task_json).map_err(|e| {
            PhaseError::permanent(format!("the coordinator sent a probe task this worker cannot read: {e}"))
        })?;
        let (rank, section_copy) = (ctx.rank, section.clone());
        let started_task = Instant::now();
        let (back, outcome) = tokio::task::spawn_blocking(move || {
            // A task that fails (a probe that diverges, say) becomes a failed row of the results with
            // its reason; the sweep goes on with the other tasks.
            let outcome = run_task(&task, &section_copy, &data, rank).unwrap_or_else(|reason| {
                tracing::warn!(task = task.id, %reason, "probe task failed; recorded as a failed row");
                ProbeOutcome::failed(task, rank, started_task.elapsed().as_secs_f64(), reason)
            });
            (data, outcome)
        })
        .await
        .map_err(|e| PhaseError::permanent(format!("probe thread failed: {e}")))?;
        data = back;
        report(ctx, &outcome).await?;
        tasks += 1;
    }
    metrics.insert("tasks".into(), f64::from(tasks));
    metrics.insert("sweep_seconds".into(), swept.elapsed().as_secs_f64());
    metrics.insert("seconds".into(), started.elapsed().as_secs_f64());
    output.metrics = metrics;
    Ok(output)
}

async fn report(ctx: &PhaseContext, outcome: &ProbeOutcome) -> Result<(), PhaseError> {
    let outcome_json =
        serde_json::to_string(outcome).map_err(|e| PhaseError::permanent(format!("probe result: {e}")))?;
    let request = wire::ReportProbeResultRequest { rank: ctx.rank, instance_id: ctx.instance_id.clone(), outcome_json };
    let answer = ctx
        .coordinator
        .clone()
        .report_probe_result(request)
        .await
        .map_err(|e| PhaseError::retryable(format!("reporting probe task {}: {}", outcome.task.id, e.message())))?;
    if !answer.into_inner().accepted {
        tracing::info!(task = outcome.task.id, "the coordinator already had this task's result");
    }
    Ok(())
}

type Issues = Vec<(String, String)>;
type Features = (SweepData, std::collections::BTreeMap<String, f64>, Issues);

struct FeatureJob {
    rank: u32,
    assignment: wire::GetAssignmentResponse,
    encoder_path: PathBuf,
    config: EncoderConfig,
    input_size: i64,
    /// The feature pass's arithmetic: pretraining's (`pretrain.precision`), in the contiguous layout.
    precision: Precision,
    seed: u64,
    random_baseline: bool,
    /// Keep every image and the encoders' weights for fine-tuning tasks.
    finetune: bool,
    /// Where rank 0 writes the probed encoder's embeddings (the run directory).
    export_dir: Option<PathBuf>,
    device: Device,
    decode: DecodeOptions,
}

impl FeatureJob {
    /// Runs on a blocking thread: both encoders onto every rank, this rank's images through them, every
    /// rank's features gathered.
    fn features(self, collective: &dyn Collective) -> Result<Features, PhaseError> {
        let mut metrics = std::collections::BTreeMap::new();
        // Rank 0 loads the pretrained encoder; every rank learns whether that worked before waiting
        // for a broadcast that would otherwise never come.
        let (mut vs, encoder) = self.build(self.seed);
        let loaded = if self.rank == 0 { load_encoder(&mut vs, &encoder, &self.encoder_path) } else { Ok(()) };
        let flags = collective
            .all_gather(&Tensor::from_slice(&[if loaded.is_ok() { 1.0f32 } else { 0.0 }]))
            .map_err(|e| PhaseError::from(e).context("probe set-up"))?;
        if let Err(e) = loaded {
            return Err(PhaseError::permanent(format!(
                "cannot load the encoder to probe from {}: {e}",
                self.encoder_path.display()
            )));
        }
        if Vec::<f32>::try_from(&flags).map_err(|e| PhaseError::permanent(e.to_string()))?[0] != 1.0 {
            return Err(PhaseError::permanent(format!(
                "rank 0 could not load the encoder to probe ({})",
                self.encoder_path.display()
            )));
        }
        // Moving features between ranks fails when a peer does: retryable.
        let moved = PhaseError::retryable;
        let checksum = broadcast_encoder(&vs, collective, 0).map_err(moved)?;
        metrics.insert("encoder_checksum_low32".into(), (checksum & 0xffff_ffff) as f64);
        let mut encoders = vec![(EncoderSource::Simclr, vs, encoder)];
        if self.random_baseline {
            let (vs, encoder) = self.build(self.seed.wrapping_add(RANDOM_ENCODER_SEED));
            broadcast_encoder(&vs, collective, 0).map_err(moved)?;
            encoders.push((EncoderSource::Random, vs, encoder));
        }

        // Each split: this rank's images, then every rank's labels and row keys gathered, and the
        // order that sorts the gathered rows by their image's place in the dataset index, so that
        // every rank holds the same rows in the same order whatever the world size.
        let mut issues = Vec::new();
        let mut splits = Vec::new();
        let mut split_images = Vec::new();
        for refs in [&self.assignment.train, &self.assignment.validation, &self.assignment.test] {
            let (x, y, keys, split_issues) =
                labelled_images(&self.assignment, self.decode, refs).map_err(PhaseError::permanent)?;
            issues.extend(split_issues);
            let y = gather_rows(collective, &y).map_err(moved)?;
            let keys = gather_rows(collective, &keys).map_err(moved)?;
            let (order, rows, images) = sorted_rows(&keys).map_err(PhaseError::permanent)?;
            splits.push((x, y.index_select(0, &order), order, rows));
            split_images.push(images);
        }
        let columns = self.assignment.label_columns.clone();
        let resize = |x: &Tensor| {
            if x.size()[2] == self.input_size {
                x.shallow_clone()
            } else {
                x.upsample_bilinear2d([self.input_size, self.input_size], false, None, None)
            }
        };
        for split in &mut splits {
            split.0 = resize(&split.0);
        }
        // Every rank's rows of `x` (this rank's), in the split's sorted order.
        let gathered = |x: &Tensor, order: &Tensor| -> Result<Tensor, PhaseError> {
            Ok(gather_rows(collective, x).map_err(moved)?.index_select(0, order))
        };
        let mut per_encoder = Vec::new();
        for (source, _vs, encoder) in &encoders {
            let mut f = Vec::new();
            for (x, _, order, _) in &splits {
                f.push(gathered(&embed(encoder, x, EMBED_BATCH, self.device), order)?);
            }
            per_encoder.push((*source, f));
        }
        if let (0, Some(dir)) = (self.rank, &self.export_dir) {
            let labels: Vec<&Tensor> = splits.iter().map(|s| &s.1).collect();
            let path = dir.join(EMBEDDINGS_FILE);
            export_embeddings(&path, &per_encoder[0].1, &labels, &split_images)
                .map_err(|e| PhaseError::permanent(format!("cannot write {}: {e}", path.display())))?;
        }
        let finetune_images = if self.finetune {
            // Every rank fine-tunes on every image: gather the pixels too (N x S*S rows).
            let side = self.input_size;
            let mut images = Vec::new();
            for (x, _, order, _) in &splits {
                let n = x.size()[0];
                images.push(gathered(&x.reshape([n, side * side]), order)?.view([-1, 1, side, side]));
            }
            Some(images)
        } else {
            None
        };
        let [(train_x, train_y, _, _), (_, validation_y, _, validation_rows), (_, test_y, _, test_rows)] =
            <[_; 3]>::try_from(splits).map_err(|_| PhaseError::permanent("three splits"))?;
        let has_validation = validation_y.size()[0] > 0;
        let validation = has_validation.then(|| ValidationData {
            y: validation_y.shallow_clone(),
            features: per_encoder.iter().map(|(s, f)| (*s, f[1].shallow_clone())).collect(),
            images: finetune_images.as_ref().map(|i| i[1].shallow_clone()),
            rows: validation_rows,
        });
        let features: Vec<_> =
            per_encoder.iter().map(|(s, f)| (*s, f[0].shallow_clone(), f[2].shallow_clone())).collect();
        let finetune = match finetune_images {
            Some(images) => {
                let states = encoders
                    .iter()
                    .map(|(source, vs, _)| {
                        (*source, vs.variables().into_iter().map(|(name, t)| (name, t.detach().copy())).collect())
                    })
                    .collect();
                Some(FineTuneData {
                    train_images: images[0].shallow_clone(),
                    test_images: images[2].shallow_clone(),
                    encoders: states,
                    config: self.config,
                    device: self.device,
                })
            }
            None => None,
        };
        let (n_train, n_test) = (train_y.size()[0], test_y.size()[0]);
        if n_train < 2 || n_test < 1 {
            return Err(PhaseError::permanent(format!(
                "the probe sweep needs labelled images in both splits; it has {n_train} training and {n_test} test images"
            )));
        }
        metrics.insert("train_images".into(), n_train as f64);
        metrics.insert("test_images".into(), n_test as f64);
        metrics.insert("validation_images".into(), validation_y.size()[0] as f64);
        metrics.insert("train_images_this_rank".into(), train_x.size()[0] as f64);
        metrics.insert("feature_dim".into(), features[0].1.size()[1] as f64);
        let data = SweepData { columns, train_y, test_y, features, test_rows, validation, finetune };
        Ok((data, metrics, issues))
    }

    fn build(&self, seed: u64) -> (nn::VarStore, Encoder) {
        let (vs, encoder) =
            with_torch_seed(seed, || var_store_drawn_on_cpu(self.device, |root| Encoder::new(root, self.config)));
        encoder.set_numerics(&vs, Numerics::new(self.precision, Some(false), self.device));
        (vs, encoder)
    }
}

/// The pixels (N x 1 x S x S), labels (N x columns) and row keys (N x 12: image index, study,
/// cluster, each as four exact float32s) of `refs` from the decode cache; an image that does not
/// decode is left out and reported.
pub(crate) fn labelled_images(
    assignment: &wire::GetAssignmentResponse,
    decode: DecodeOptions,
    refs: &[wire::ImageRef],
) -> Result<(Tensor, Tensor, Tensor, Issues), String> {
    let root = Path::new(&assignment.data_root);
    let cache =
        DecodeCache::open(&simclr_data::cache_dir().join("decoded")).map_err(|e| e.to_string())?.with_options(decode);
    let size = assignment.image_size;
    let columns = assignment.label_columns.len();
    let decoded: Vec<Result<Vec<f32>, String>> = refs
        .par_iter()
        .map(|r| {
            if r.labels.len() != columns {
                return Err(format!("{} labels for {columns} label columns", r.labels.len()));
            }
            cache.get_or_decode(root, &cache_key(r, size)).map(|(pixels, _)| pixels).map_err(|e| e.to_string())
        })
        .collect();
    let (mut pixels, mut labels, mut keys, mut issues) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for (r, result) in refs.iter().zip(decoded) {
        match result {
            Ok(p) => {
                pixels.extend_from_slice(&p);
                labels.extend_from_slice(&r.labels);
                for v in [r.index, r.study, r.group] {
                    keys.extend(u64_to_f32s(v));
                }
            }
            Err(reason) => issues.push((r.path.clone(), format!("probe: {reason}"))),
        }
    }
    let n = (labels.len() / columns.max(1)) as i64;
    let side = size as i64;
    let x = Tensor::from_slice(&pixels).view([n, 1, side, side]).to_kind(Kind::Float);
    let y = Tensor::from_slice(&labels).view([n, columns as i64]);
    let keys = Tensor::from_slice(&keys).view([n, 12]);
    Ok((x, y, keys, issues))
}

/// The order that sorts gathered rows by image index (N x 12 keys from `FeatureJob::images`), the
/// sorted rows' studies and clusters, and their image indices.
pub(crate) fn sorted_rows(keys: &Tensor) -> Result<(Tensor, Rows, Vec<u64>), String> {
    let flat = Vec::<f32>::try_from(keys.flatten(0, -1)).map_err(|e| e.to_string())?;
    let rows: Vec<[u64; 3]> =
        flat.chunks(12).map(|k| [f32s_to_u64(&k[0..4]), f32s_to_u64(&k[4..8]), f32s_to_u64(&k[8..12])]).collect();
    let mut order: Vec<usize> = (0..rows.len()).collect();
    order.sort_by_key(|&i| rows[i][0]);
    let sorted = Rows {
        study: order.iter().map(|&i| rows[i][1]).collect(),
        cluster: order.iter().map(|&i| rows[i][2]).collect(),
    };
    let images = order.iter().map(|&i| rows[i][0]).collect();
    Ok((Tensor::from_slice(&order.iter().map(|&i| i as i64).collect::<Vec<_>>()), sorted, images))
}

/// The probed encoder's features of every image, written by rank 0 into the run directory for the
/// user's own analyses (the coordinator adds `embeddings.csv` and the projection plot).
pub const EMBEDDINGS_FILE: &str = "embeddings.safetensors";

/// Writes `features` (N x D: the training, validation and test splits' rows one after the other, each
/// sorted by image index), `image_index` (N, the dataset index's), `split` (N: 0 training, 1
/// validation, 2 test), `labels` (N x label columns) and `projection` (N x 2: the features' first two
/// principal components, each signed so that its largest loading is positive), atomically.
fn export_embeddings(path: &Path, features: &[Tensor], labels: &[&Tensor], images: &[Vec<u64>]) -> Result<(), String> {
    let x = Tensor::cat(features, 0).to_device(Device::Cpu).to_kind(Kind::Float);
    let y = Tensor::cat(labels, 0).to_device(Device::Cpu).to_kind(Kind::Float);
    let index: Vec<i64> = images.iter().flatten().map(|&i| i as i64).collect();
    let split: Vec<i64> = images.iter().enumerate().flat_map(|(s, v)| std::iter::repeat_n(s as i64, v.len())).collect();
    let n = x.size()[0];
    if index.len() as i64 != n || y.size()[0] != n {
        return Err(format!("{n} feature rows but {} image indices and {} label rows", index.len(), y.size()[0]));
    }
    let projection = principal_components(&x, 2)?;
    let tensors = [
        ("features", x),
        ("image_index", Tensor::from_slice(&index)),
        ("split", Tensor::from_slice(&split)),
        ("labels", y),
        ("projection", projection),
    ];
    simclr_common::atomic_file::write_atomic(path, |tmp| {
        Tensor::write_safetensors(&tensors, tmp).map_err(|e| std::io::Error::other(e.to_string()))
    })
    .map_err(|e| e.to_string())
}

/// The rows of `x` (N x D) on its first `k` principal axes (N x k; fewer columns if N or D is smaller),
/// each axis signed so that its largest loading is positive (SVD's sign is otherwise arbitrary).
fn principal_components(x: &Tensor, k: i64) -> Result<Tensor, String> {
    let _guard = tch::no_grad_guard();
    let (n, d) = (x.size()[0], x.size()[1]);
    let k = k.min(n).min(d);
    if n == 0 || k == 0 {
        return Ok(Tensor::zeros([n, 0], (Kind::Float, Device::Cpu)));
    }
    let x = x.to_kind(Kind::Double);
    let centred = &x - x.mean_dim(0, true, Kind::Double);
    // torch.svd: V (D x min(N, D)), not transposed.
    let (_, _, v) = centred.f_svd(true, true).map_err(|e| format!("principal components: {e}"))?;
    let axes = v.transpose(0, 1).narrow(0, 0, k);
    let biggest = axes.abs().argmax(1, true);
    let axes = &axes * axes.gather(1, &biggest, false).sign();
    Ok(centred.matmul(&axes.transpose(0, 1)).to_kind(Kind::Float))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_components_match_the_covariances_eigenvectors() {
        // Points along (3, 4)/5, plus a little along (-4, 3)/5, offset by (7, -2): the first
        // component is the position along (3, 4)/5 (eigenvector of the 2 x 2 covariance with the larger
        // eigenvalue), the second along (-4, 3)/5, each up to the sign rule (largest loading positive).
        // The two coordinates have mean 0 and are uncorrelated, so those directions are exactly the axes.
        let along = [-10.0f64, -5.0, 0.0, 5.0, 10.0];
        let across = [0.1f64, -0.2, 0.0, 0.2, -0.1];
        let mut rows = Vec::new();
        for (a, b) in along.iter().zip(&across) {
            rows.push((7.0 + 0.6 * a - 0.8 * b) as f32);
            rows.push((-2.0 + 0.8 * a + 0.6 * b) as f32);
        }
        let x = Tensor::from_slice(&rows).view([5, 2]);
        let p = Vec::<f32>::try_from(principal_components(&x, 2).unwrap().flatten(0, -1)).unwrap();
        let mean_a = along.iter().sum::<f64>() / 5.0;
        let mean_b = across.iter().sum::<f64>() / 5.0;
        for i in 0..5 {
            // (3, 4)/5: largest loading 0.8 > 0, sign +; (-4, 3)/5: largest |loading| is -0.8, so flipped.
            assert!((p[2 * i] as f64 - (along[i] - mean_a)).abs() < 1e-4, "{p:?}");
            assert!((p[2 * i + 1] as f64 + (across[i] - mean_b)).abs() < 1e-4, "{p:?}");
        }
        assert_eq!(principal_components(&Tensor::zeros([0, 4], (Kind::Float, Device::Cpu)), 2).unwrap().size(), [0, 0]);
    }
}
