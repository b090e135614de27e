//! Header-only indexing of a DICOM tree: every file is opened up to (not including) its pixel data,
//! in parallel, and becomes either an `ImageRecord` or a `BadFile` with its reason. Nothing is dropped
//! silently: a file the index cannot use is listed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use dicom_core::Tag;
use dicom_dictionary_std::tags;
use dicom_object::OpenFileOptions;
use rayon::prelude::*;
use serde::Serialize;

use crate::pixels::string;

/// One usable image file, as its header describes it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImageRecord {
    /// Path relative to the dataset root.
    pub path: PathBuf,
    pub sop_uid: String,
    pub study_uid: String,
    pub series_uid: String,
    pub patient_id: Option<String>,
    pub transfer_syntax: String,
    pub photometric: String,
    pub bits_stored: u16,
    pub rows: u32,
    pub cols: u32,
    pub frames: u32,
    pub file_size: u64,
    /// Modification time (ns since the epoch): with the size, the file's identity for the decode cache.
    pub modified_ns: u128,
}

/// A file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BadFile {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DatasetIndex {
    pub images: Vec<ImageRecord>,
    pub bad: Vec<BadFile>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot read dataset directory {path}: {source}")]
    Walk { path: PathBuf, source: std::io::Error },
    #[error("dataset directory {0} holds no files")]
    Empty(PathBuf),
}

/// Files that are metadata, not images: label tables, notes.
fn is_metadata(path: &Path) -> bool {
    let hidden = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.'));
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    hidden || matches!(ext.as_deref(), Some("csv" | "txt" | "json" | "md" | "toml"))
}

/// Every candidate image file under `root`, sorted (the index order does not depend on the file system).
pub fn list_files(root: &Path) -> Result<Vec<PathBuf>, IndexError> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| IndexError::Walk { path: dir.clone(), source })?;
        for entry in entries {
            let entry = entry.map_err(|source| IndexError::Walk { path: dir.clone(), source })?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|source| IndexError::Walk { path: path.clone(), source })?;
            if kind.is_dir() {
                if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
                    stack.push(path);
                }
            } else if !is_metadata(&path) {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Indexes `root` with all threads; `progress(done, total)` is called as files complete.
pub fn index_tree(root: &Path, progress: &(dyn Fn(usize, usize) + Sync)) -> Result<DatasetIndex, IndexError> {
    let files = list_files(root)?;
    if files.is_empty() {
        return Err(IndexError::Empty(root.to_path_buf()));
    }
    let done = AtomicUsize::new(0);
    let results: Vec<Result<ImageRecord, BadFile>> = files
        .par_iter()
        .map(|path| {
            let relative = path.strip_prefix(root).unwrap_or(path).to_path_buf();
            let result = read_header(path, relative.clone()).map_err(|reason| BadFile { path: relative, reason });
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, files.len());
            result
        })
        .collect();
    let mut index = DatasetIndex::default();
    for r in results {
        match r {
            Ok(image) => index.images.push(image),
            Err(bad) => index.bad.push(bad),
        }
    }
    let mut seen = std::collections::HashMap::new();
    let mut duplicates = Vec::new();
    for (i, img) in index.images.iter().enumerate() {
        if let Some(first) = seen.insert(img.sop_uid.clone(), i) {
            duplicates.push((i, first));
        }
    }
    // A SOP Instance UID twice is the same image twice (a copied file): keep the first, report the rest.
    for &(i, first) in duplicates.iter().rev() {
        let dup = index.images.remove(i);
        index.bad.push(BadFile {
            path: dup.path,
            reason: format!(
                "duplicate SOP Instance UID {} (also in {})",
                dup.sop_uid,
                index.images[first].path.display()
            ),
        });
    }
    index.bad.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(index)
}

fn read_header(path: &Path, relative: PathBuf) -> Result<ImageRecord, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot stat: {e}"))?;
    crate::guard::check_file(path, crate::guard::Extent::UntilPixelData)
        .map_err(|e| format!("not a readable DICOM file: {e}"))?;
    let obj = std::panic::catch_unwind(|| OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(path))
        .map_err(|panic| format!("not a readable DICOM file: parser failed: {}", crate::pixels::panic_message(&panic)))?
        .map_err(|e| format!("not a readable DICOM file: {e}"))?;
    let text = |tag: Tag, name: &str| -> Result<String, String> {
        string(&obj, tag).filter(|s| !s.is_empty()).ok_or_else(|| format!("missing {name}"))
    };
    let number = |tag: Tag, name: &str| -> Result<u32, String> {
        obj.get(tag).and_then(|e| e.to_int::<u32>().ok()).ok_or_else(|| format!("missing or invalid {name}"))
    };
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    Ok(ImageRecord {
        path: relative,
        sop_uid: text(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?,
        study_uid: text(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?,
        series_uid: string(&obj, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
        patient_id: string(&obj, tags::PATIENT_ID).filter(|s| !s.is_empty()),
        transfer_syntax: obj.meta().transfer_syntax().trim_end_matches('\0').to_string(),
        photometric: text(tags::PHOTOMETRIC_INTERPRETATION, "PhotometricInterpretation")?,
        bits_stored: number(tags::BITS_STORED, "BitsStored")? as u16,
        rows: number(tags::ROWS, "Rows")?,
        cols: number(tags::COLUMNS, "Columns")?,
        frames: string(&obj, tags::NUMBER_OF_FRAMES).and_then(|s| s.parse().ok()).unwrap_or(1),
        file_size: meta.len(),
        modified_ns,
    })
}
