//! The DICOM data plane, pure Rust (no libtorch): the coordinator indexes, splits and orders with it,
//! workers decode with it, and `synth` writes the synthetic SIIM-format dataset with it.

pub mod cache;
pub mod dataset;
pub mod dicom_writer;
pub mod guard;
pub mod index;
pub mod labels;
pub mod phantom;
pub mod pixels;
pub mod synth;

use std::path::{Component, Path, PathBuf};

/// Environment variable naming the cache directory (synthetic datasets, decoded images).
pub const CACHE_DIR_ENV: &str = "SIMCLR_CACHE_DIR";

/// `$SIMCLR_CACHE_DIR`, else `$XDG_CACHE_HOME/simclr-cluster`, else `~/.cache/simclr-cluster`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV).filter(|d| !d.is_empty()) {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("simclr-cluster");
    }
    std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| ".".into()).join(".cache/simclr-cluster")
}

/// Checks that `path` (an image path from an index or from the network) stays inside the dataset root
/// it is joined to: relative, and made only of plain names (no `..`, no root, no drive prefix). The
/// check is lexical: links the dataset's owner placed inside the root are followed as usual.
pub fn check_inside_root(path: &Path) -> Result<(), String> {
    if path.as_os_str().is_empty() {
        return Err("empty image path".into());
    }
    for component in path.components() {
        match component {
            Component::Normal(_) | Component::CurDir => {}
            Component::ParentDir => {
                return Err(format!("image path {} climbs out of the dataset root", path.display()))
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(format!(
                    "image path {} is absolute; only paths inside the dataset root are read",
                    path.display()
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_paths_stay_inside_the_root() {
        for ok in ["a.dcm", "study/series/a.dcm", "./a.dcm", "a..b/c.dcm"] {
            assert!(check_inside_root(Path::new(ok)).is_ok(), "{ok}");
        }
        for (bad, why) in
            [("../etc/passwd", "climbs"), ("a/../../b", "climbs"), ("/etc/passwd", "absolute"), ("", "empty")]
        {
            let err = check_inside_root(Path::new(bad)).unwrap_err();
            assert!(err.contains(why) && err.contains(bad), "{bad}: {err}");
        }
    }
}
