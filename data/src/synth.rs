//! The synthetic SIIM-FISABIO-RSNA dataset: chest-radiograph phantoms written as DICOM in the Kaggle
//! layout (`train/<study>/<series>/<image>.dcm`, `train_study_level.csv`, `train_image_level.csv`).
//! Every file is a function of (seed, study index), so the dataset is the same whatever the number of
//! threads. Files vary the way real exports do: transfer syntax, photometric interpretation, bit depth,
//! rescale, window, several images per study, patients with several studies.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::dicom_writer::{write_image, Encoding, ImageHeader};
use crate::phantom::{render, sample_findings, Acquisition, Anatomy, PixelBox, StudyClass};

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub studies: usize,
    pub seed: u64,
    /// Side of the written images in pixels.
    pub image_size: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Dicom(#[from] crate::dicom_writer::WriteError),
    #[error("cannot write {path}: {source}")]
    Csv { path: PathBuf, source: csv::Error },
    #[error("--studies must be at least 1")]
    NoStudies,
}

/// What was written, for the log and for tests.
#[derive(Debug, Clone, Default)]
pub struct SynthSummary {
    pub studies: usize,
    pub images: usize,
    pub patients: usize,
    pub classes: BTreeMap<&'static str, usize>,
    pub encodings: BTreeMap<String, usize>,
}

struct StudyPlan {
    index: usize,
    patient: usize,
    patient_id: String,
    study_uid: String,
    class: StudyClass,
}

struct WrittenImage {
    sop_uid: String,
    study_uid: String,
    boxes: Vec<PixelBox>,
    encoding: Encoding,
}

/// A UID under the 2.25 root (a 128-bit number written in decimal), as PS3.5 B.2 allows.
fn uid(rng: &mut impl Rng) -> String {
    format!("2.25.{}", rng.gen::<u128>() >> 1)
}

fn stream_rng(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

const PATIENT_STREAM: u64 = 1 << 40;

pub fn write_dataset(out: &Path, opts: &SynthOptions) -> Result<SynthSummary, SynthError> {
    if opts.studies == 0 {
        return Err(SynthError::NoStudies);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Io { path, source }
    };
    std::fs::create_dir_all(out.join("train")).map_err(io(out))?;

    // Plan: studies grouped into patients (most have one study, some two or three).
    let mut plan_rng = stream_rng(opts.seed, 0);
    let mut plans = Vec::with_capacity(opts.studies);
    let mut patient = 0;
    while plans.len() < opts.studies {
        let n = match plan_rng.gen_range(0..100) {
            0..=79 => 1,
            80..=94 => 2,
            _ => 3,
        };
        let patient_id = format!("SYN{:06}", patient);
        for _ in 0..n {
            if plans.len() == opts.studies {
                break;
            }
            plans.push(StudyPlan {
                index: plans.len(),
                patient,
                patient_id: patient_id.clone(),
                study_uid: uid(&mut plan_rng),
                class: StudyClass::sample(&mut plan_rng),
            });
        }
        patient += 1;
    }

    let written: Vec<Vec<WrittenImage>> =
        plans.par_iter().map(|plan| write_study(out, opts, plan)).collect::<Result<_, _>>()?;

    let study_csv = out.join("train_study_level.csv");
    let mut w =
        csv::Writer::from_path(&study_csv).map_err(|source| SynthError::Csv { path: study_csv.clone(), source })?;
    let csv_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| SynthError::Csv { path, source }
    };
    let mut header = vec!["id".to_string()];
    header.extend(StudyClass::ALL.iter().map(|c| c.column().to_string()));
    w.write_record(&header).map_err(csv_err(&study_csv))?;
    for plan in &plans {
        let mut row = vec![format!("{}_study", plan.study_uid)];
        row.extend(StudyClass::ALL.iter().map(|&c| if c == plan.class { "1" } else { "0" }.to_string()));
        w.write_record(&row).map_err(csv_err(&study_csv))?;
    }
    w.flush().map_err(io(&study_csv))?;

    let image_csv = out.join("train_image_level.csv");
    let mut w = csv::Writer::from_path(&image_csv).map_err(csv_err(&image_csv))?;
    w.write_record(["id", "boxes", "label", "StudyInstanceUID"]).map_err(csv_err(&image_csv))?;
    let mut summary = SynthSummary { studies: plans.len(), patients: patient, ..Default::default() };
    for (plan, images) in plans.iter().zip(&written) {
        *summary.classes.entry(plan.class.column()).or_default() += 1;
        for img in images {
            summary.images += 1;
            *summary.encodings.entry(format!("{:?}", img.encoding)).or_default() += 1;
            let (boxes, label) = box_columns(&img.boxes);
            w.write_record([format!("{}_image", img.sop_uid), boxes, label, img.study_uid.clone()])
                .map_err(csv_err(&image_csv))?;
        }
    }
    w.flush().map_err(io(&image_csv))?;
    let mut readme = std::fs::File::create(out.join("SYNTHETIC.txt")).map_err(io(out))?;
    writeln!(
        readme,
        "Synthetic chest-radiograph phantoms in the SIIM-FISABIO-RSNA COVID-19 layout, written by simclr-coordinator synth\n\
         studies={} images={} patients={} seed={} size={}",
        summary.studies, summary.images, summary.patients, opts.seed, opts.image_size
    )
    .map_err(io(out))?;
    Ok(summary)
}

/// The image-level CSV's `boxes` (a Python-literal list of dicts, empty without findings) and `label`
/// (`opacity 1 x1 y1 x2 y2 ...`, or `none 1 0 0 1 1`) columns, as Kaggle wrote them.
fn box_columns(boxes: &[PixelBox]) -> (String, String) {
    if boxes.is_empty() {
        return (String::new(), "none 1 0 0 1 1".into());
    }
    let dicts: Vec<String> = boxes
        .iter()
        .map(|(x, y, w, h)| format!("{{'x': {x:.5}, 'y': {y:.5}, 'width': {w:.5}, 'height': {h:.5}}}"))
        .collect();
    let labels: Vec<String> =
        boxes.iter().map(|(x, y, w, h)| format!("opacity 1 {x:.5} {y:.5} {:.5} {:.5}", x + w, y + h)).collect();
    (format!("[{}]", dicts.join(", ")), labels.join(" "))
}

fn write_study(out: &Path, opts: &SynthOptions, plan: &StudyPlan) -> Result<Vec<WrittenImage>, SynthError> {
    let anatomy = Anatomy::sample(&mut stream_rng(opts.seed, PATIENT_STREAM + plan.patient as u64));
    let mut rng = stream_rng(opts.seed, 1 + plan.index as u64);
    let findings = sample_findings(plan.class, &anatomy, &mut rng);
    let n_images = match rng.gen_range(0..100) {
        0..=84 => 1,
        85..=96 => 2,
        _ => 3,
    };
    let mut series_uid = uid(&mut rng);
    let mut written = Vec::new();
    for k in 0..n_images {
        if k > 0 && rng.gen_bool(0.5) {
            series_uid = uid(&mut rng);
        }
        let acq = Acquisition::sample(&mut rng);
        let (intensity, boxes) = render(opts.image_size, &anatomy, &findings, &acq, &mut rng);
        let header = sample_header(&mut rng, plan, &series_uid);
        let stored = to_stored(&intensity, &header);
        let dir = out.join("train").join(&plan.study_uid).join(&series_uid);
        std::fs::create_dir_all(&dir).map_err(|source| SynthError::Io { path: dir.clone(), source })?;
        let side = opts.image_size as u16;
        write_image(&dir.join(format!("{}.dcm", header.sop_uid)), &header, side, side, &stored)?;
        written.push(WrittenImage {
            sop_uid: header.sop_uid.clone(),
            study_uid: plan.study_uid.clone(),
            boxes,
            encoding: header.encoding,
        });
    }
    Ok(written)
}

fn sample_header(rng: &mut impl Rng, plan: &StudyPlan, series_uid: &str) -> ImageHeader {
    let encoding = match rng.gen_range(0..100) {
        0..=34 => Encoding::ExplicitVrLittleEndian,
        35..=59 => Encoding::ImplicitVrLittleEndian,
        60..=79 => Encoding::RleLossless,
        80..=89 => Encoding::ExplicitVrBigEndian,
        _ => Encoding::DeflatedExplicitVrLittleEndian,
    };
    let bits_stored = match rng.gen_range(0..100) {
        0..=39 => 16,
        40..=84 => 12,
        _ => 8,
    };
    let monochrome1 = rng.gen_bool(0.3);
    // DX files pair MONOCHROME1 with an INVERSE presentation LUT shape; some MONOCHROME2 files carry
    // INVERSE alone (both mean: low values display white).
    let presentation_lut_inverse = if monochrome1 { rng.gen_bool(0.5) } else { rng.gen_bool(0.05) };
    let max = ((1u32 << bits_stored) - 1) as f64;
    let rescale = match rng.gen_range(0..100) {
        0..=59 => None,
        60..=79 => Some((1.0, 0.0)),
        80..=91 => Some((0.5, -100.0)),
        _ => Some((-1.0, max)),
    };
    let window = if rng.gen_bool(0.6) {
        let (slope, intercept) = rescale.unwrap_or((1.0, 0.0));
        let (lo, hi) =
            if slope >= 0.0 { (intercept, intercept + slope * max) } else { (intercept + slope * max, intercept) };
        let narrowing: f64 = rng.gen_range(0.8..1.0);
        Some(((lo + hi) / 2.0, ((hi - lo) * narrowing).round().max(2.0)))
    } else {
        None
    };
    ImageHeader {
        patient_id: plan.patient_id.clone(),
        study_uid: plan.study_uid.clone(),
        series_uid: series_uid.to_string(),
        sop_uid: uid(rng),
        encoding,
        monochrome1,
        bits_stored,
        rescale,
        window,
        presentation_lut_inverse,
    }
}

/// Display intensities (bright = dense) to stored values such that the pixel pipeline (rescale, VOI,
/// inversion for MONOCHROME1 or an INVERSE presentation LUT) shows them again as bright = dense.
pub fn to_stored(intensity: &[f32], h: &ImageHeader) -> Vec<u16> {
    let max = ((1u32 << h.bits_stored) - 1) as f64;
    let inverted = h.monochrome1 || h.presentation_lut_inverse;
    let negative_slope = h.rescale.is_some_and(|(slope, _)| slope < 0.0);
    intensity
        .iter()
        .map(|&i| {
            let mut v = i as f64;
            if inverted {
                v = 1.0 - v;
            }
            if negative_slope {
                v = 1.0 - v;
            }
            (v * max).round().clamp(0.0, max) as u16
        })
        .collect()
}

/// The synthetic dataset for `opts` under `cache`, generated on first use. Generation happens in a
/// temporary directory renamed into place when complete, so an interrupted run never leaves a partial
/// dataset that a later run would trust.
pub fn ensure_synthetic(cache: &Path, opts: &SynthOptions) -> Result<PathBuf, SynthError> {
    let name = format!("synth-v1-n{}-s{}-p{}", opts.studies, opts.seed, opts.image_size);
    let dir = cache.join(&name);
    if dir.join(COMPLETE_MARKER).is_file() {
        return Ok(dir);
    }
    let tmp = cache.join(format!(".{name}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    write_dataset(&tmp, opts)?;
    std::fs::write(tmp.join(COMPLETE_MARKER), b"").map_err(|source| SynthError::Io { path: tmp.clone(), source })?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process finished the same dataset first: theirs is as good as ours.
        Err(_) if dir.join(COMPLETE_MARKER).is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(source) => Err(SynthError::Io { path: dir, source }),
    }
}

const COMPLETE_MARKER: &str = ".complete";
