//! The decode phase: this rank decodes its share of every image the job reads (training images,
//! validation and test) once through the pixel pipeline into the host's decode cache, so that training
//! and probing read preprocessed pixels instead of DICOM. Files that fail are reported with their
//! reason, and the coordinator leaves them out of every later assignment; with
//! `data.on_bad_file = "fail"` the first one fails the phase. Parser warnings are summarised in one log
//! line per kind, not one per file.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use simclr_common::config::OnBadFile;
use simclr_data::cache::{CacheKey, CacheOutcome, DecodeCache};
use simclr_data::pixels::DecodeOptions;

use crate::phase::assignments::{cache_key, Purpose};
use crate::phase::{PhaseContext, PhaseError, PhaseOutput};

const PHASE: &str = "decode";

pub async fn run(ctx: &PhaseContext) -> Result<PhaseOutput, PhaseError> {
    let assignment = ctx.assignments().fetch(Purpose::Decode).await?;
    let mut output = PhaseOutput::default();
    if assignment.data_root.is_empty() {
        output.metrics.insert("images".into(), 0.0);
        return Ok(output);
    }
    let root = PathBuf::from(&assignment.data_root);
    if !root.is_dir() {
        return Err(PhaseError::permanent(format!(
            "dataset root {} is not visible on this host: workers need the dataset at the same path as the coordinator",
            root.display()
        )));
    }
    let cache_path = simclr_data::cache_dir().join("decoded");
    let cache = DecodeCache::open(&cache_path)
        .map_err(|e| PhaseError::permanent(e.to_string()))?
        .with_options(DecodeOptions::of(&ctx.config.data));
    let keys: Vec<CacheKey> = assignment
        .train
        .iter()
        .chain(&assignment.validation)
        .chain(&assignment.test)
        .map(|r| cache_key(r, assignment.image_size))
        .collect();
    let total = keys.len();
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let counter = Arc::clone(&done);
    // CPU-bound: decode on rayon's threads, off the async runtime that serves heartbeats and peers.
    let mut work = tokio::task::spawn_blocking(move || {
        keys.par_iter()
            .map(|key| {
                let (result, warnings) = simclr_common::logging::capture_file_warnings(|| {
                    cache.get_or_decode(&root, key).map(|(_, outcome)| outcome)
                });
                counter.fetch_add(1, Ordering::Relaxed);
                (key.path.display().to_string(), result, warnings)
            })
            .collect::<Vec<_>>()
    });
    let results = loop {
        tokio::select! {
            r = &mut work => break r.map_err(|e| PhaseError::permanent(format!("decode task failed: {e}")))?,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                ctx.report_progress(PHASE, done.load(Ordering::Relaxed) as u64, total as u64).await;
            }
        }
    };
    let (mut hits, mut decoded, mut rebuilt) = (0usize, 0usize, 0usize);
    let mut warned: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (path, result, warnings) in results {
        for message in warnings.into_iter().collect::<std::collections::BTreeSet<_>>() {
            warned.entry(message).or_default().push(path.clone());
        }
        match result {
            Ok(CacheOutcome::Hit) => hits += 1,
            Ok(CacheOutcome::Miss) => decoded += 1,
            Ok(CacheOutcome::Rebuilt) => rebuilt += 1,
            Err(e) => output.issues.push((path, format!("decode: {e}"))),
        }
    }
    for (message, paths) in &warned {
        let more = if paths.len() > 3 { ", ..." } else { "" };
        tracing::warn!(
            files = paths.len(),
            "DICOM parser: {message} (in {}{more})",
            paths[..paths.len().min(3)].join(", ")
        );
    }
    let seconds = started.elapsed().as_secs_f64();
    if let (OnBadFile::Fail, Some((path, reason))) = (ctx.config.data.on_bad_file, output.issues.first()) {
        return Err(PhaseError::permanent(format!("{path}: {reason} (data.on_bad_file = \"fail\")")));
    }
    for (name, value) in [
        ("images", total as f64),
        ("train_images", assignment.train.len() as f64),
        ("validation_images", assignment.validation.len() as f64),
        ("test_images", assignment.test.len() as f64),
        ("cache_hits", hits as f64),
        ("decoded", decoded as f64),
        ("rebuilt", rebuilt as f64),
        ("failed", output.issues.len() as f64),
        ("seconds", seconds),
        ("images_per_s", total as f64 / seconds.max(1e-9)),
    ] {
        output.metrics.insert(name.into(), value);
    }
    tracing::info!(images = total, hits, decoded, rebuilt, failed = output.issues.len(), seconds, cache = %cache_path.display(), "decode done");
    Ok(output)
}
