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

use crate::guard::{Extent, PixelData};
use crate::pixels::{check_header, open_bytes, string, DecodeError, DecodeOptions, Samples};

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
    pub kind: BadKind,
    pub reason: String,
}

/// Why a file cannot be used, in a word (the `kind` column of `data_issues.csv`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadKind {
    /// Not DICOM, truncated, or corrupt.
    Unreadable,
    /// A data set without File Meta header (`data.accept_no_meta`).
    NoFileMeta,
    /// No Study or SOP Instance UID, Rows, Columns, ...
    MissingAttribute,
    /// A colour image (`data.color`).
    Colour,
    /// What the pixel pipeline does not handle: transfer syntax, photometric interpretation, bits, size.
    Unsupported,
    NoPixelData,
    /// Its pixels failed to decode in the decode phase.
    Undecodable,
    /// Another file has the same SOP Instance UID.
    Duplicate,
    /// The images of its study disagree on the study's labels.
    LabelsDisagree,
}

impl BadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BadKind::Unreadable => "unreadable",
            BadKind::NoFileMeta => "no_file_meta",
            BadKind::MissingAttribute => "missing_attribute",
            BadKind::Colour => "colour",
            BadKind::Unsupported => "unsupported",
            BadKind::NoPixelData => "no_pixel_data",
            BadKind::Undecodable => "undecodable",
            BadKind::Duplicate => "duplicate",
            BadKind::LabelsDisagree => "labels_disagree",
        }
    }

    pub fn of(e: &DecodeError) -> BadKind {
        match e {
            DecodeError::NotDicom(_) | DecodeError::Refused(_) => BadKind::Unreadable,
            DecodeError::NoFileMeta => BadKind::NoFileMeta,
            DecodeError::Attribute(_) => BadKind::MissingAttribute,
            DecodeError::Color(_) => BadKind::Colour,
            DecodeError::UnsupportedTransferSyntax { .. } | DecodeError::Unsupported(_) => BadKind::Unsupported,
            DecodeError::NoPixelData => BadKind::NoPixelData,
            DecodeError::Pixels(_) => BadKind::Undecodable,
        }
    }
}

/// A third-party parser's warning about one file (read anyway).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FileWarning {
    pub path: PathBuf,
    pub message: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct DatasetIndex {
    pub images: Vec<ImageRecord>,
    pub bad: Vec<BadFile>,
    /// Parser warnings, per file, in path order.
    pub warnings: Vec<FileWarning>,
}

impl DatasetIndex {
    /// Moves the images `drop` says to the unusable list, with their kind and reason.
    pub fn exclude(&mut self, mut drop: impl FnMut(&ImageRecord) -> Option<(BadKind, String)>) {
        let mut kept = Vec::with_capacity(self.images.len());
        for image in std::mem::take(&mut self.images) {
            match drop(&image) {
                Some((kind, reason)) => self.bad.push(BadFile { path: image.path, kind, reason }),
                None => kept.push(image),
            }
        }
        self.images = kept;
        self.bad.sort_by(|a, b| a.path.cmp(&b.path));
    }
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

/// Indexes `root` with all threads; `progress(done, total)` is called as files complete. Every check the
/// pixel pipeline makes from the header runs here, so that a file the index accepts reaches the decoder
/// only for reasons its header could not show.
pub fn index_tree(
    root: &Path,
    options: DecodeOptions,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<DatasetIndex, IndexError> {
    let files = list_files(root)?;
    if files.is_empty() {
        return Err(IndexError::Empty(root.to_path_buf()));
    }
    let done = AtomicUsize::new(0);
    let results: Vec<(Result<ImageRecord, BadFile>, Vec<String>)> = files
        .par_iter()
        .map(|path| {
            let relative = path.strip_prefix(root).unwrap_or(path).to_path_buf();
            let (result, warnings) = simclr_common::logging::capture_file_warnings(|| {
                read_header(path, relative.clone(), options).map_err(|(kind, reason)| BadFile {
                    path: relative.clone(),
                    kind,
                    reason,
                })
            });
            progress(done.fetch_add(1, Ordering::Relaxed) + 1, files.len());
            (result, warnings)
        })
        .collect();
    let mut index = DatasetIndex::default();
    for (file, (result, warnings)) in files.iter().zip(results) {
        let relative = file.strip_prefix(root).unwrap_or(file);
        let mut seen = std::collections::BTreeSet::new();
        for message in warnings {
            // One line per distinct warning per file.
            if seen.insert(message.clone()) {
                index.warnings.push(FileWarning { path: relative.to_path_buf(), message });
            }
        }
        match result {
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
            kind: BadKind::Duplicate,
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

fn read_header(path: &Path, relative: PathBuf, options: DecodeOptions) -> Result<ImageRecord, (BadKind, String)> {
    let unreadable = |e: String| (BadKind::Unreadable, format!("not a readable DICOM file: {e}"));
    let meta = std::fs::metadata(path).map_err(|e| unreadable(format!("cannot stat: {e}")))?;
    // The whole file is walked (values are skipped, not read): a truncated or corrupt file is refused
    // here, not by a worker.
    let walked = crate::guard::check_file(path, Extent::Everything).map_err(unreadable)?;
    let bare = walked == PixelData::Unknown && {
        let mut head = [0u8; 132];
        let n = std::fs::File::open(path).and_then(|mut f| std::io::Read::read(&mut f, &mut head)).unwrap_or(0);
        crate::guard::lacks_file_meta(&head[..n])
    };
    let (obj, pixel_data) = if bare {
        // Without File Meta there is no header to stop after: the data set is read whole.
        let bytes = std::fs::read(path).map_err(|e| unreadable(format!("cannot read: {e}")))?;
        open_bytes(&bytes, Extent::Everything, options).map_err(|e| (BadKind::of(&e), e.to_string()))?
    } else {
        let obj = std::panic::catch_unwind(|| OpenFileOptions::new().read_until(tags::PIXEL_DATA).open_file(path))
            .map_err(|panic| unreadable(format!("parser failed: {}", crate::pixels::panic_message(&panic))))?
            .map_err(|e| unreadable(e.to_string()))?;
        (obj, walked)
    };
    let text = |tag: Tag, name: &str| -> Result<String, (BadKind, String)> {
        string(&obj, tag)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| (BadKind::MissingAttribute, format!("missing {name}")))
    };
    let sop_uid = text(tags::SOP_INSTANCE_UID, "SOPInstanceUID")?;
    let study_uid = text(tags::STUDY_INSTANCE_UID, "StudyInstanceUID")?;
    if pixel_data == PixelData::Absent {
        return Err((BadKind::NoPixelData, DecodeError::NoPixelData.to_string()));
    }
    let layout = check_header(&obj, options).map_err(|e| (BadKind::of(&e), e.to_string()))?;
    match pixel_data {
        PixelData::Present { length: Some(length) } => {
            // Native pixel data must hold at least the first frame, which is what is decoded. Twice
            // the samples per pixel (YBR_FULL_422 stores two per pixel on average).
            let samples_x2 = match layout.samples {
                Samples::Monochrome { .. } => 2,
                Samples::Color(crate::pixels::ColorLayout::YbrFull422) => 4,
                Samples::Color(_) => 6,
            };
            let need =
                u64::from(layout.rows) * u64::from(layout.cols) * samples_x2 * u64::from(layout.bits_allocated) / 16;
            if u64::from(length) < need {
                return Err((
                    BadKind::Unreadable,
                    format!(
                        "pixel data holds {length} bytes; {}x{} pixels of {} bits need {need}",
                        layout.rows, layout.cols, layout.bits_allocated
                    ),
                ));
            }
        }
        PixelData::Present { length: None } | PixelData::Absent | PixelData::Unknown => {}
    }
    let modified_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    Ok(ImageRecord {
        path: relative,
        sop_uid,
        study_uid,
        series_uid: string(&obj, tags::SERIES_INSTANCE_UID).unwrap_or_default(),
        patient_id: string(&obj, tags::PATIENT_ID).filter(|s| !s.is_empty()),
        transfer_syntax: obj.meta().transfer_syntax().trim_end_matches('\0').to_string(),
        photometric: text(tags::PHOTOMETRIC_INTERPRETATION, "PhotometricInterpretation")?,
        bits_stored: layout.bits_stored as u16,
        rows: layout.rows,
        cols: layout.cols,
        frames: string(&obj, tags::NUMBER_OF_FRAMES).and_then(|s| s.parse().ok()).unwrap_or(1),
        file_size: meta.len(),
        modified_ns,
    })
}
