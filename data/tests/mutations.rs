//! Seeded mutations of valid DICOM files (bit flips, overwritten bytes, truncations, spliced runs)
//! through the index and the pixel pipeline: every outcome must be a value or an error, never a panic
//! or a hang. Not a substitute for coverage-guided fuzzing, but it runs in every test run.

use rand::{Rng, SeedableRng};
use simclr_data::dicom_writer::{write_image, Encoding, ImageHeader};
use simclr_data::index::index_tree;
use simclr_data::pixels::decode_file;

fn seed_files(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for (k, encoding) in Encoding::ALL.into_iter().enumerate() {
        let header = ImageHeader {
            patient_id: "P".into(),
            study_uid: "2.25.1".into(),
            series_uid: "2.25.2".into(),
            sop_uid: format!("2.25.{}", 10 + k),
            encoding,
            monochrome1: k % 2 == 0,
            bits_stored: if k % 2 == 0 { 12 } else { 8 },
            rescale: Some((1.0, -10.0)),
            window: Some((100.0, 300.0)),
            presentation_lut_inverse: false,
        };
        let max = (1u16 << header.bits_stored) - 1;
        let stored: Vec<u16> = (0..16 * 16).map(|i| (i as u16 * 37) % max).collect();
        let path = dir.join(format!("seed{k}.dcm"));
        write_image(&path, &header, 16, 16, &stored).unwrap();
        out.push(std::fs::read(&path).unwrap());
    }
    out
}

fn mutate(rng: &mut impl Rng, bytes: &[u8]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for _ in 0..rng.gen_range(1..=4) {
        match rng.gen_range(0..5) {
            0 => {
                let i = rng.gen_range(0..b.len());
                b[i] ^= 1 << rng.gen_range(0..8);
            }
            1 => {
                let i = rng.gen_range(0..b.len());
                b[i] = [0x00, 0xff, 0x7f, 0x80][rng.gen_range(0..4)];
            }
            2 => {
                let len = rng.gen_range(0..b.len());
                b.truncate(len.max(1));
            }
            3 => {
                // Overwrite a 4-byte, length-sized field with a length far past the end of the file
                // (16 MiB: multi-gigabyte ones cost seconds each, see CASES).
                if b.len() > 8 {
                    let i = rng.gen_range(0..b.len() - 4);
                    b[i..i + 4].copy_from_slice(&[0xff, 0xff, 0xff, 0x00]);
                }
            }
            _ => {
                let i = rng.gen_range(0..b.len());
                let j = rng.gen_range(0..b.len());
                let n = rng.gen_range(1..32).min(b.len() - i.max(j));
                let chunk = b[j..j + n].to_vec();
                b.splice(i..i, chunk);
            }
        }
    }
    b
}

/// Mutated length fields make dicom-rs 0.10 allocate and zero the declared length before it finds the
/// file too short (up to gigabytes, about a second each on this machine), so the case count stays small.
const CASES: usize = 80;

#[test]
fn mutated_files_give_errors_or_images_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let seeds = seed_files(dir.path());
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2026);
    let cases = dir.path().join("cases");
    std::fs::create_dir_all(&cases).unwrap();
    let (mut ok, mut errors) = (0, 0);
    for case in 0..CASES {
        let bytes = mutate(&mut rng, &seeds[case % seeds.len()]);
        let path = cases.join(format!("{case:04}.dcm"));
        std::fs::write(&path, &bytes).unwrap();
        match decode_file(&path) {
            Ok(img) => {
                assert_eq!(img.pixels.len(), (img.rows * img.cols) as usize);
                assert!(img.pixels.iter().all(|v| v.is_finite()), "case {case}: non-finite pixels");
                ok += 1;
            }
            Err(_) => errors += 1,
        }
    }
    // The index reads every mutated header without panicking and accounts for every file.
    let index = index_tree(&cases, Default::default(), &|_, _| {}).unwrap();
    assert_eq!(index.images.len() + index.bad.len(), CASES);
    eprintln!("{CASES} mutated files: {ok} decoded, {errors} rejected with an error");
}
