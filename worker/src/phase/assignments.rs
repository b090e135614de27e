//! Data access of the phases that read images (decode, pretrain, probe): this rank's share, asked of the
//! coordinator and checked against what this worker may read, and the decode-cache key of each image.

use std::path::{Path, PathBuf};

use simclr_data::cache::CacheKey;
use simclr_proto::client::CoordinatorClient;
use simclr_proto::wire;

use crate::phase::PhaseError;

/// Where a phase asks for this rank's images: the coordinator, with what it answers checked against
/// what this worker may read.
#[derive(Clone)]
pub(crate) struct Assignments {
    pub client: CoordinatorClient,
    pub rank: u32,
    pub instance_id: String,
    /// `--data-root`: the dataset root the coordinator names must lie inside it (as this host
    /// sees it, after `data_mount`).
    pub data_root_limit: Option<PathBuf>,
    /// `--data-mount FROM=TO`: a dataset root the coordinator names under FROM is read under TO here.
    pub data_mount: Option<(PathBuf, PathBuf)>,
}

/// What a phase asks its images for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purpose {
    /// Every image the job reads, this rank's share, to decode into the cache.
    Decode,
    /// This rank's slots of one pretraining epoch.
    Pretrain { epoch: u64 },
    /// This rank's share of the labelled images, for the probe sweep's features.
    Probe,
}

impl Assignments {
    /// This rank's images for `purpose`. An answer that would read outside the dataset (an image path
    /// with `..` or an absolute one, a root outside `--data-root`) is refused whole, naming the path.
    /// A failed call is retryable (the coordinator may be back for the next attempt); a refused answer
    /// is permanent.
    pub(crate) async fn fetch(&self, purpose: Purpose) -> Result<wire::GetAssignmentResponse, PhaseError> {
        let (epoch, probe, decode) = match purpose {
            Purpose::Decode => (0, false, true),
            Purpose::Pretrain { epoch } => (epoch, false, false),
            Purpose::Probe => (0, true, false),
        };
        let request =
            wire::GetAssignmentRequest { rank: self.rank, instance_id: self.instance_id.clone(), epoch, probe, decode };
        let mut assignment =
            self.client.clone().get_assignment(request).await.map(|r| r.into_inner()).map_err(|e| {
                PhaseError::retryable(format!("cannot get this rank's images ({purpose:?}): {}", e.message()))
            })?;
        if let Some((from, to)) = &self.data_mount {
            assignment.data_root = mounted(&assignment.data_root, from, to);
        }
        check_assignment(&assignment, self.data_root_limit.as_deref()).map_err(PhaseError::permanent)?;
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
    for image in a.train.iter().chain(&a.validation).chain(&a.test) {
        simclr_data::check_inside_root(Path::new(&image.path))
            .map_err(|e| format!("refused an assignment from the coordinator: {e}"))?;
    }
    Ok(())
}

/// `root` as this host sees it: under `to` if it lies under `from` (path components, not characters),
/// else unchanged.
fn mounted(root: &str, from: &Path, to: &Path) -> String {
    match Path::new(root).strip_prefix(from) {
        Ok(rest) if rest.as_os_str().is_empty() && !root.is_empty() => to.display().to_string(),
        Ok(rest) if !root.is_empty() => to.join(rest).display().to_string(),
        _ => root.to_string(),
    }
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
    fn a_mounted_dataset_root_is_read_where_this_host_mounts_it() {
        let (from, to) = (Path::new("/cache/synthetic"), Path::new("/hosts/a/data"));
        assert_eq!(mounted("/cache/synthetic", from, to), "/hosts/a/data");
        assert_eq!(mounted("/cache/synthetic/v2", from, to), "/hosts/a/data/v2");
        // A sibling whose name merely starts the same, and roots elsewhere, stay as they are.
        assert_eq!(mounted("/cache/synthetic-2", from, to), "/cache/synthetic-2");
        assert_eq!(mounted("/data/siim", from, to), "/data/siim");
        assert_eq!(mounted("", from, to), "");
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
