//! The decode phase: this rank decodes its assigned images (its epoch-0 training shard and its share
//! of the test images) once through the pixel pipeline into the host's decode cache, so that training
//! and probing read preprocessed pixels instead of DICOM. Unusable files are reported with their reason;
//! with `data.on_bad_file = "fail"` the first one fails the phase.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use simclr_common::config::OnBadFile;
use simclr_data::cache::{CacheKey, CacheOutcome, DecodeCache};
use simclr_proto::client::CoordinatorClient;
use simclr_proto::wire;

use crate::session::{PhaseContext, PhaseOutput};

const PHASE: &str = "decode";

/// Where a phase asks for this rank's images: the coordinator, with what it answers checked against
/// what this worker may read.
#[derive(Clone)]
pub(crate) struct Assignments {
    pub client: CoordinatorClient,
    pub rank: u32,
    pub instance_id: String,
    /// `--data-root`: the dataset root the coordinator names must lie inside it.
    pub data_root_limit: Option<PathBuf>,
}

impl Assignments {
    /// This rank's images for `epoch` (or, with `probe`, for the probe sweep). An answer that would
    /// read outside the dataset (an image path with `..` or an absolute one, a root outside
    /// `--data-root`) is refused whole, naming the path.
    pub(crate) async fn fetch(&self, epoch: u64, probe: bool) -> Result<wire::GetAssignmentResponse, String> {
        let request =
            wire::GetAssignmentRequest { rank: self.rank, instance_id: self.instance_id.clone(), epoch, probe };
        let assignment = self
            .client
            .clone()
            .get_assignment(request)
            .await
            .map(|r| r.into_inner())
            .map_err(|e| format!("cannot get this rank's images for epoch {epoch}: {}", e.message()))?;
        check_assignment(&assignment, self.data_root_limit.as_deref())?;
        Ok(assignment)
    }
}

fn check_assignment(a: &wire::GetAssignmentResponse, limit: Option<&Path>) -> Result<(), String> {
    if a.data_root.is_empty() {
        return Ok(());
    }
    let root = Path::new(&a.data_root);
    if let Some(limit) = limit {
        let inside = root.is_absolute()
            && !root.components().any(|c| c == std::path::Component::ParentDir)
            && root.starts_with(limit);
        if !inside {
            return Err(format!(
                "refused: the coordinator's dataset root {} is outside this worker's --data-root {}",
                root.display(),
                limit.display()
            ));
        }
    }
    for image in a.train.iter().chain(&a.test) {
        simclr_data::check_inside_root(Path::new(&image.path))
            .map_err(|e| format!("refused an assignment from the coordinator: {e}"))?;
    }
    Ok(())
}

/// The decode-cache key of an assigned image preprocessed to `image_size`.
pub(crate) fn cache_key(r: &wire::ImageRef, image_size: u32) -> CacheKey {
    CacheKey {
        path: PathBuf::from(&r.path),
        sop_uid: r.sop_uid.clone(),
        file_size: r.file_size,
        modified_ns: r.modified_ns,
        image_size,
    }
}

pub async fn run(ctx: &PhaseContext) -> Result<PhaseOutput, String> {
    let assignment = ctx.assignments().fetch(0, false).await?;
    let mut output = PhaseOutput::default();
    if assignment.data_root.is_empty() {
        output.metrics.insert("images".into(), 0.0);
        return Ok(output);
    }
    let root = PathBuf::from(&assignment.data_root);
    if !root.is_dir() {
        return Err(format!(
            "dataset root {} is not visible on this host: workers need the dataset at the same path as the coordinator",
            root.display()
        ));
    }
    let cache_path = simclr_data::cache_dir().join("decoded");
    let cache = DecodeCache::open(&cache_path).map_err(|e| e.to_string())?;
    let keys: Vec<CacheKey> =
        assignment.train.iter().chain(&assignment.test).map(|r| cache_key(r, assignment.image_size)).collect();
    let total = keys.len();
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let counter = Arc::clone(&done);
    // CPU-bound: decode on rayon's threads, off the async runtime that serves heartbeats and peers.
    let mut work = tokio::task::spawn_blocking(move || {
        keys.par_iter()
            .map(|key| {
                let result = cache.get_or_decode(&root, key).map(|(_, outcome)| outcome);
                counter.fetch_add(1, Ordering::Relaxed);
                (key.path.display().to_string(), result)
            })
            .collect::<Vec<_>>()
    });
    let results = loop {
        tokio::select! {
            r = &mut work => break r.map_err(|e| format!("decode task failed: {e}"))?,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                ctx.report_progress(PHASE, done.load(Ordering::Relaxed) as u64, total as u64).await;
            }
        }
    };
    let (mut hits, mut decoded, mut rebuilt) = (0usize, 0usize, 0usize);
    for (path, result) in results {
        match result {
            Ok(CacheOutcome::Hit) => hits += 1,
            Ok(CacheOutcome::Miss) => decoded += 1,
            Ok(CacheOutcome::Rebuilt) => rebuilt += 1,
            Err(e) => output.issues.push((path, format!("decode: {e}"))),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if let (OnBadFile::Fail, Some((path, reason))) = (ctx.config.data.on_bad_file, output.issues.first()) {
        return Err(format!("{path}: {reason} (data.on_bad_file = \"fail\")"));
    }
    for (name, value) in [
        ("images", total as f64),
        ("train_images", assignment.train.len() as f64),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn assignment(root: &str, paths: &[&str]) -> wire::GetAssignmentResponse {
        wire::GetAssignmentResponse {
            data_root: root.into(),
            train: paths.iter().map(|p| wire::ImageRef { path: p.to_string(), ..Default::default() }).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn assignments_that_would_read_outside_the_dataset_are_refused() {
        let limit = Path::new("/data");
        assert!(check_assignment(&assignment("/data/siim", &["a/b.dcm"]), Some(limit)).is_ok());
        assert!(check_assignment(&assignment("/anywhere", &["a/b.dcm"]), None).is_ok());
        for (a, why) in [
            (assignment("/data/siim", &["ok.dcm", "../../etc/shadow"]), "../../etc/shadow"),
            (assignment("/data/siim", &["/etc/shadow"]), "absolute"),
            (assignment("/etc", &["passwd"]), "outside this worker's --data-root /data"),
            (assignment("/data/../etc", &["passwd"]), "outside"),
            (assignment("data/siim", &["a.dcm"]), "outside"),
        ] {
            let err = check_assignment(&a, Some(limit)).unwrap_err();
            assert!(err.starts_with("refused") && err.contains(why), "{err}");
        }
    }
}
