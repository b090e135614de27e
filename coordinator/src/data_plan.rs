//! The coordinator's side of the data plane: finds the dataset (or generates the synthetic one),
//! indexes its headers, joins the labels, splits studies into train, validation and test, checks that
//! the training images fill a global batch, and writes what it found into the run directory: `dataset.json` (the summary), `split.csv`
//! (every study's side) and `data_issues.csv` (every file or label row that cannot be used, with why).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use simclr_common::config::{DataSection, OnBadFile};
use simclr_data::cache_dir;
use simclr_data::dataset::{epoch_order, patient_groups, split_studies, Dataset, StudySplit};
use simclr_data::index::{index_tree, FileWarning};
use simclr_data::labels::LabelTable;
use simclr_data::pixels::DecodeOptions;
use simclr_data::synth::{ensure_synthetic, SynthOptions};

use crate::error::CoordinatorError;
use crate::run_dir::{csv_text, RunDir};

/// A dataset ready for the job.
pub struct PreparedData {
    pub root: PathBuf,
    pub synthetic: bool,
    pub dataset: Dataset,
    pub split: StudySplit,
    /// Each study's bootstrap group (`dataset::patient_groups`).
    pub groups: Vec<usize>,
    /// Each image's study (index into `dataset.studies`).
    pub study_of: Vec<usize>,
    /// The training studies' images, sorted: what every epoch's order shuffles (less the files the
    /// decode phase finds undecodable: `job::Job`).
    pub training_images: Vec<usize>,
    /// Each image's index by its path relative to the root, as workers name files.
    pub image_of_path: HashMap<String, usize>,
    /// The label columns the probes learn: one (`data.target`), every column (`data.multi_label`), or
    /// none (an unlabelled dataset: pretraining only).
    pub targets: Vec<usize>,
    pub summary: serde_json::Value,
}

/// Finds or generates the dataset (the synthetic one from `data.split_seed`), indexes it and splits it;
/// with `batch_size` (pretraining's global batch), checks that the training images fill one.
pub fn prepare(data: &DataSection, batch_size: Option<usize>) -> Result<PreparedData, CoordinatorError> {
    let seed = data.split_seed;
    let (root, synthetic) = match &data.path {
        Some(path) => (path.clone(), false),
        None => {
            let opts = SynthOptions { studies: data.synthetic_studies, seed, image_size: data.synthetic_size };
            let started = Instant::now();
            let root = ensure_synthetic(&cache_dir(), &opts).map_err(|e| CoordinatorError::Data(e.to_string()))?;
            tracing::info!(path = %root.display(), studies = opts.studies, elapsed_s = started.elapsed().as_secs_f64(), "synthetic dataset ready");
            (root, true)
        }
    };
    if !root.is_dir() {
        return Err(CoordinatorError::Data(format!(
            "dataset directory {} does not exist (data.path / --data)",
            root.display()
        )));
    }
    let dataset = load(&root, DecodeOptions::of(data))?;
    if dataset.index.images.is_empty() {
        return Err(CoordinatorError::Data(format!(
            "no usable image in {} ({} unusable files; see data_issues.csv)",
            root.display(),
            dataset.index.bad.len()
        )));
    }
    let targets = if data.multi_label || dataset.label_columns.is_empty() {
        (0..dataset.label_columns.len()).collect()
    } else {
        vec![dataset.label_columns.iter().position(|c| *c == data.target).ok_or_else(|| {
            CoordinatorError::Data(format!(
                "data.target '{}' is not a label column (columns: {})",
                data.target,
                dataset.label_columns.join(", ")
            ))
        })?]
    };
    let split = split_studies(&dataset.studies, data.test_fraction, data.validation_fraction, seed)
        .map_err(|e| CoordinatorError::Data(e.to_string()))?;
    let training_images = split.training_images(&dataset.studies);
    let steps = match batch_size {
        Some(b) => {
            let order = epoch_order(&training_images, b, 0, 0, data.shard_policy)
                .map_err(|e| CoordinatorError::Data(e.to_string()))?;
            Some(order.len() / b)
        }
        None => None,
    };
    let summary = summarize(&root, synthetic, &dataset, Some(&split), &targets, steps, &BTreeSet::new());
    let groups = patient_groups(&dataset.studies);
    let mut study_of = vec![usize::MAX; dataset.index.images.len()];
    for (s, study) in dataset.studies.iter().enumerate() {
        for &i in &study.images {
            study_of[i] = s;
        }
    }
    let image_of_path =
        dataset.index.images.iter().enumerate().map(|(i, img)| (img.path.display().to_string(), i)).collect();
    Ok(PreparedData {
        root,
        synthetic,
        dataset,
        split,
        groups,
        study_of,
        training_images,
        image_of_path,
        targets,
        summary,
    })
}

/// Indexes `root` (headers only, all threads) and joins its labels.
pub fn load(root: &Path, options: DecodeOptions) -> Result<Dataset, CoordinatorError> {
    let started = Instant::now();
    // On a terminal a progress bar; in a log (a batch job, a pod) a line every 2 s.
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "indexing DICOM headers {bar:40} {pos}/{len} files ({per_sec}, {eta} left)",
            )
            .expect("a valid template"),
        );
        bar
    });
    let last = std::sync::Mutex::new(Instant::now());
    let progress = |done: usize, total: usize| match &bar {
        Some(bar) => {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        }
        None => {
            if let Ok(mut last) = last.lock() {
                if last.elapsed() >= Duration::from_secs(2) || done == total {
                    *last = Instant::now();
                    tracing::info!(done, total, percent = 100 * done / total.max(1), "indexing DICOM headers");
                }
            }
        }
    };
    let index = index_tree(root, options, &progress);
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let index = index.map_err(|e| CoordinatorError::Data(e.to_string()))?;
    let labels = LabelTable::load(root).map_err(|e| CoordinatorError::Data(e.to_string()))?;
    let dataset = Dataset::assemble(index, &labels);
    log_warnings(&dataset.index.warnings);
    tracing::info!(
        images = dataset.index.images.len(),
        unusable = dataset.index.bad.len(),
        studies = dataset.studies.len(),
        elapsed_s = started.elapsed().as_secs_f64(),
        "dataset indexed"
    );
    Ok(dataset)
}

/// The parsers' warnings in a few lines: each distinct message once, with how many files raised it and
/// the first few paths (every one is in `data_issues.csv`).
fn log_warnings(warnings: &[FileWarning]) {
    let mut by_message: BTreeMap<&str, Vec<&Path>> = BTreeMap::new();
    for w in warnings {
        by_message.entry(w.message.as_str()).or_default().push(&w.path);
    }
    for (message, paths) in by_message {
        let first: Vec<String> = paths.iter().take(3).map(|p| p.display().to_string()).collect();
        let more = if paths.len() > first.len() { ", ..." } else { "" };
        tracing::warn!(files = paths.len(), "DICOM parser: {message} (in {}{more})", first.join(", "));
    }
}

fn count<'a>(items: impl Iterator<Item = String> + 'a) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for item in items {
        *out.entry(item).or_default() += 1;
    }
    out
}

/// The dataset summary written as `dataset.json` and printed by `inspect`; the `excluded` images (by
/// index: those the decode phase could not decode) count as unusable files.
pub fn summarize(
    root: &Path,
    synthetic: bool,
    d: &Dataset,
    split: Option<&StudySplit>,
    targets: &[usize],
    steps_per_epoch: Option<usize>,
    excluded: &BTreeSet<usize>,
) -> serde_json::Value {
    let images: Vec<&simclr_data::index::ImageRecord> =
        d.index.images.iter().enumerate().filter(|(i, _)| !excluded.contains(i)).map(|(_, img)| img).collect();
    let usable = |study: &simclr_data::dataset::Study| study.images.iter().filter(|i| !excluded.contains(i)).count();
    let patients = count(d.studies.iter().filter_map(|s| s.patient.clone())).len();
    let positives: BTreeMap<&str, f64> = d
        .label_columns
        .iter()
        .enumerate()
        .map(|(c, name)| {
            (name.as_str(), d.studies.iter().filter_map(|s| s.labels.as_ref()).map(|l| f64::from(l[c])).sum())
        })
        .collect();
    let unlabelled_images: usize = d.studies.iter().filter(|s| s.labels.is_none()).map(usable).sum();
    let side = |studies: &[usize]| {
        let n_images: usize = studies.iter().map(|&i| usable(&d.studies[i])).sum();
        // Per target column: the share of this side's labelled studies that are positive.
        let positive: BTreeMap<&str, f64> = targets
            .iter()
            .map(|&t| {
                let labelled: Vec<f32> =
                    studies.iter().filter_map(|&i| d.studies[i].labels.as_ref().map(|l| l[t])).collect();
                let rate = if labelled.is_empty() {
                    0.0
                } else {
                    labelled.iter().map(|&v| f64::from(v)).sum::<f64>() / labelled.len() as f64
                };
                (d.label_columns[t].as_str(), rate)
            })
            .collect();
        json!({"studies": studies.len(), "images": n_images, "positive_rate": positive})
    };
    json!({
        "root": root.display().to_string(),
        "synthetic": synthetic,
        "files": d.index.images.len() + d.index.bad.len(),
        "usable_images": images.len(),
        "unusable_files": d.index.bad.len() + excluded.len(),
        "unusable_by_kind": count(
            d.index.bad.iter().map(|b| b.kind.as_str().to_string()).chain(excluded.iter().map(|_| "undecodable".to_string()))
        ),
        "studies": d.studies.len(),
        "patients_with_id": patients,
        "labelled_studies": d.labelled_studies(),
        "images_without_label": unlabelled_images,
        "label_rows_without_image": d.orphan_label_rows.len(),
        "label_columns": d.label_columns,
        "positives_per_column": positives,
        "task": match targets.len() {
            0 => "unlabelled (pretraining only)",
            1 => "binary",
            _ => "multi-label",
        },
        "targets": targets.iter().map(|&t| d.label_columns[t].as_str()).collect::<Vec<_>>(),
        "transfer_syntaxes": count(images.iter().map(|i| transfer_syntax_name(&i.transfer_syntax))),
        "photometric": count(images.iter().map(|i| i.photometric.clone())),
        "bits_stored": count(images.iter().map(|i| i.bits_stored.to_string())),
        "image_sizes": count(images.iter().map(|i| format!("{}x{}", i.cols, i.rows))),
        "multi_frame_files": images.iter().filter(|i| i.frames > 1).count(),
        "split": split.map(|s| json!({"train": side(&s.train), "validation": side(&s.validation), "test": side(&s.test)})),
        "pretrain_steps_per_epoch": steps_per_epoch,
    })
}

fn transfer_syntax_name(uid: &str) -> String {
    use dicom_transfer_syntax_registry::{TransferSyntaxIndex, TransferSyntaxRegistry};
    match TransferSyntaxRegistry.get(uid) {
        Some(ts) => format!("{} ({uid})", ts.name()),
        None => format!("unknown ({uid})"),
    }
}

/// Every unusable file (its kind: unreadable, colour, labels_disagree, ...), parser warning, label row
/// without image and image without label, one per line.
pub fn issues_csv(d: &Dataset) -> String {
    let mut rows: Vec<[String; 3]> = Vec::new();
    for bad in &d.index.bad {
        rows.push([bad.kind.as_str().into(), bad.path.display().to_string(), bad.reason.clone()]);
    }
    for w in &d.index.warnings {
        rows.push(["parser_warning".into(), w.path.display().to_string(), w.message.clone()]);
    }
    for row in &d.orphan_label_rows {
        rows.push(["label_without_image".into(), row.clone(), "no image of this study or path in the tree".into()]);
    }
    for s in d.studies.iter().filter(|s| s.labels.is_none() && !d.label_columns.is_empty()) {
        for &i in &s.images {
            rows.push([
                "image_without_label".into(),
                d.index.images[i].path.display().to_string(),
                format!("study {} has no label row (usable for pretraining only)", s.uid),
            ]);
        }
    }
    csv_text(&["kind", "item", "reason"], rows)
}

/// `split.csv`: every study's side and its number of usable images.
fn write_split(prepared: &PreparedData, excluded: &BTreeSet<usize>, run_dir: &RunDir) -> Result<(), CoordinatorError> {
    let d = &prepared.dataset;
    let mut rows: Vec<[String; 4]> = Vec::new();
    for (side, studies) in prepared.split.sides() {
        for &i in studies {
            let s = &d.studies[i];
            let images = s.images.iter().filter(|i| !excluded.contains(i)).count();
            rows.push([s.uid.clone(), s.patient.clone().unwrap_or_default(), side.into(), images.to_string()]);
        }
    }
    let split = csv_text(&["study", "patient", "side", "images"], rows);
    run_dir.write_atomic("split.csv", split.as_bytes()).map_err(CoordinatorError::RunDir)
}

/// Once the decode phase is over: `dataset.json` and `split.csv` again, without the `excluded` images
/// (those that did not decode; `worker_file_issues.csv` names them), and the steps per epoch of what
/// is left.
pub fn write_decoded_reports(
    prepared: &PreparedData,
    excluded: &BTreeSet<usize>,
    steps_per_epoch: Option<usize>,
    run_dir: &RunDir,
) -> Result<(), CoordinatorError> {
    let summary = summarize(
        &prepared.root,
        prepared.synthetic,
        &prepared.dataset,
        Some(&prepared.split),
        &prepared.targets,
        steps_per_epoch,
        excluded,
    );
    let mut text = serde_json::to_string_pretty(&summary).unwrap_or_default();
    text.push('\n');
    run_dir.write_atomic("dataset.json", text.as_bytes()).map_err(CoordinatorError::RunDir)?;
    write_split(prepared, excluded, run_dir)
}

/// Writes the data reports into the run directory and applies `on_bad_file`.
pub fn write_reports(prepared: &PreparedData, data: &DataSection, run_dir: &RunDir) -> Result<(), CoordinatorError> {
    let d = &prepared.dataset;
    let mut summary = serde_json::to_string_pretty(&prepared.summary).unwrap_or_default();
    summary.push('\n');
    run_dir.write_atomic("dataset.json", summary.as_bytes()).map_err(CoordinatorError::RunDir)?;
    run_dir.write_atomic("data_issues.csv", issues_csv(d).as_bytes()).map_err(CoordinatorError::RunDir)?;
    write_split(prepared, &BTreeSet::new(), run_dir)?;
    if !d.index.bad.is_empty() {
        let first = &d.index.bad[0];
        let message = format!(
            "{} unusable files in {} (first: {}: {}); the full list is in {}",
            d.index.bad.len(),
            prepared.root.display(),
            first.path.display(),
            first.reason,
            run_dir.path().join("data_issues.csv").display()
        );
        match data.on_bad_file {
            OnBadFile::Skip => tracing::warn!("{message}; skipped (data.on_bad_file = \"skip\")"),
            OnBadFile::Fail => return Err(CoordinatorError::Data(format!("{message} (data.on_bad_file = \"fail\")"))),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use simclr_data::synth::write_dataset;

    fn prepared(root: &Path, target: &str, multi_label: bool) -> Result<PreparedData, CoordinatorError> {
        let data = DataSection {
            path: Some(root.to_path_buf()),
            target: target.into(),
            multi_label,
            ..DataSection::default()
        };
        prepare(&data, Some(4))
    }

    #[test]
    fn one_target_or_every_siim_class() {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), &SynthOptions { studies: 30, seed: 5, image_size: 32 }).unwrap();

        let binary = prepared(dir.path(), "Typical Appearance", false).unwrap();
        assert_eq!(binary.targets.len(), 1);
        assert_eq!(binary.dataset.label_columns[binary.targets[0]], "Typical Appearance");
        assert_eq!(binary.summary["task"], "binary");

        let multi = prepared(dir.path(), "Typical Appearance", true).unwrap();
        assert_eq!(multi.targets, vec![0, 1, 2, 3]);
        assert_eq!(multi.summary["task"], "multi-label");
        // The four SIIM study classes are one-hot: on each side the positive rates add up to one.
        for side in ["train", "validation", "test"] {
            let rates = multi.summary["split"][side]["positive_rate"].as_object().unwrap();
            assert_eq!(rates.len(), 4, "{side}: {rates:?}");
            let total: f64 = rates.values().map(|v| v.as_f64().unwrap()).sum();
            assert!((total - 1.0).abs() < 1e-9, "{side}: {rates:?}");
        }
        // The binary rate is the same column's rate in the multi-label summary.
        assert_eq!(
            binary.summary["split"]["train"]["positive_rate"]["Typical Appearance"],
            multi.summary["split"]["train"]["positive_rate"]["Typical Appearance"]
        );

        let Err(CoordinatorError::Data(message)) = prepared(dir.path(), "Typical", false) else {
            panic!("an unknown target column was accepted");
        };
        assert!(message.contains("data.target 'Typical'") && message.contains("Typical Appearance"), "{message}");
    }
}
