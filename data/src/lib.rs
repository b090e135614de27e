//! The DICOM data plane, pure Rust (no libtorch): the coordinator indexes, splits and shards with it,
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

use std::path::PathBuf;

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
