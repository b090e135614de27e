//! Decode + preprocess throughput (DICOM file -> pixel pipeline -> 64x64), per transfer syntax, on one
//! thread and on all threads. `scripts/bench_decode.sh` runs it beside pydicom on the same files.
//!
//! cargo bench -p simclr-data --bench decode -- [DIR] [IMAGES_PER_SYNTAX] [SIDE]

use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use simclr_data::dicom_writer::{write_image, Encoding, ImageHeader};
use simclr_data::phantom::{render, sample_findings, Acquisition, Anatomy, StudyClass};
use simclr_data::pixels::{decode_file, resize};
use simclr_data::synth::to_stored;

fn main() {
    let all_args: Vec<String> = std::env::args().skip(1).collect();
    let write_only = all_args.iter().any(|a| a == "--write-only");
    let args: Vec<&String> = all_args.iter().filter(|a| !a.starts_with("--")).collect();
    let dir = PathBuf::from(args.first().map(|s| s.as_str()).unwrap_or("target/bench-decode"));
    let per_syntax: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(100);
    let side: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(512);
    let mut sets: Vec<(String, Vec<PathBuf>)> =
        Encoding::ALL.iter().map(|&e| (format!("{e:?}"), ensure_files(&dir, e, per_syntax, side))).collect();
    if write_only {
        return;
    }
    // Syntaxes our writer has no encoder for, transcoded from the same phantoms by GDCM
    // (scripts/bench_pydicom.py --transcode), when present.
    let suffix = format!("-{side}");
    let mut extra: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|entries| entries.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    extra.retain(|p| {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        name.ends_with(&suffix) && !sets.iter().any(|(s, _)| format!("{s}{suffix}") == name)
    });
    extra.sort();
    for sub in extra {
        let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or("").trim_end_matches(&suffix).to_string();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&sub).unwrap().map(|e| e.unwrap().path()).collect();
        files.sort();
        sets.push((name, files));
    }
    let threads = rayon::current_num_threads();
    println!("| transfer syntax | images | {side}x{side} -> 64x64, 1 thread (img/s) | {threads} threads (img/s) |");
    println!("|---|---|---|---|");
    for (name, files) in sets {
        let run = |paths: &[PathBuf]| {
            let start = Instant::now();
            let checksum: f64 = paths
                .par_iter()
                .map(|p| {
                    let img = decode_file(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                    resize(&img, 64).iter().map(|&v| v as f64).sum::<f64>()
                })
                .sum();
            assert!(checksum.is_finite());
            paths.len() as f64 / start.elapsed().as_secs_f64()
        };
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(|| run(&files));
        let all = run(&files);
        println!("| {name} | {} | {one:.0} | {all:.0} |", files.len());
    }
}

/// Writes `n` phantom radiographs (12 bits stored, half MONOCHROME1, with a window) once per syntax.
fn ensure_files(dir: &Path, encoding: Encoding, n: usize, side: usize) -> Vec<PathBuf> {
    let sub = dir.join(format!("{encoding:?}-{side}"));
    let paths: Vec<PathBuf> = (0..n).map(|i| sub.join(format!("{i:05}.dcm"))).collect();
    if paths.iter().all(|p| p.is_file()) {
        return paths;
    }
    std::fs::create_dir_all(&sub).expect("bench directory");
    paths.par_iter().enumerate().for_each(|(i, path)| {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(i as u64);
        let anatomy = Anatomy::sample(&mut rng);
        let class = StudyClass::sample(&mut rng);
        let findings = sample_findings(class, &anatomy, &mut rng);
        let (pixels, _) = render(side, &anatomy, &findings, &Acquisition::sample(&mut rng), &mut rng);
        let header = ImageHeader {
            patient_id: format!("B{i}"),
            study_uid: format!("2.25.{}", 1000 + i),
            series_uid: format!("2.25.{}", 2000 + i),
            sop_uid: format!("2.25.{}", 3000 + i),
            encoding,
            monochrome1: rng.gen_bool(0.5),
            bits_stored: 12,
            rescale: None,
            window: Some((2047.5, 4096.0)),
            presentation_lut_inverse: false,
        };
        let stored = to_stored(&pixels, &header);
        write_image(path, &header, side as u16, side as u16, &stored).expect("bench file written");
    });
    paths
}
