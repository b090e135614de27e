//! The compressed transfer syntaxes our own writer does not produce, read from files that third-party
//! software wrote (GDCM 3.2.6; pydicom 3.0.1 with CharLS and OpenJPEG): see
//! scripts/make_codec_fixtures.py. The expected pixels are the generator's formulas, evaluated again
//! here, pushed through the standard's pipeline in f64. Lossless files must match exactly; lossy ones
//! within the codec's error (JPEG-LS near-lossless guarantees |error| <= NEAR).

use std::path::PathBuf;

use simclr_data::pixels::{decode_bytes, decode_file};

const ROWS: usize = 40;
const COLS: usize = 32;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/codecs").join(name)
}

/// scripts/make_codec_fixtures.py `textured`.
fn textured(bits: u32, frame: i64) -> Vec<i64> {
    let mut v: Vec<i64> = (0..ROWS as i64)
        .flat_map(|r| (0..COLS as i64).map(move |c| (r * 61 + c * 17 + (r * c * 7) % 251 + frame * 1009) % (1 << bits)))
        .collect();
    v[0] = 0;
    v[1] = (1 << bits) - 1;
    v
}

/// scripts/make_codec_fixtures.py `smooth` (numpy's rint rounds half to even).
fn smooth(bits: u32) -> Vec<i64> {
    let top = ((1i64 << bits) - 1) as f64;
    (0..ROWS)
        .flat_map(|r| {
            (0..COLS).map(move |c| {
                (top * (0.5 + 0.4 * (r as f64 / 6.0).sin() * (c as f64 / 5.0).cos())).round_ties_even() as i64
            })
        })
        .collect()
}

/// Modality LUT, then the image's own range (no window, no VOI LUT), then optional inversion.
fn by_image_range(stored: &[i64], slope: f64, intercept: f64, invert: bool) -> Vec<f64> {
    let m: Vec<f64> = stored.iter().map(|&v| slope * v as f64 + intercept).collect();
    let lo = m.iter().cloned().fold(f64::INFINITY, f64::min);
    let hi = m.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    m.iter().map(|&x| (x - lo) / (hi - lo)).map(|y| if invert { 1.0 - y } else { y }).collect()
}

fn decode(name: &str) -> (Vec<f64>, u32) {
    let img = decode_file(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!((img.rows as usize, img.cols as usize), (ROWS, COLS), "{name}");
    (img.pixels.iter().map(|&p| p as f64).collect(), img.frames)
}

fn assert_exact(name: &str, want: &[f64]) {
    let (got, _) = decode(name);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() < 1e-6, "{name} pixel {i}: got {g}, want {w}");
    }
}

/// Lossy files carry the window (center 2^(b-1), width 2^b) that maps stored v to v / (2^b - 1), so
/// the output times 2^b - 1 is the decoded stored value.
fn assert_lossy(name: &str, bits: u32, max_error: f64, max_mean_error: f64) {
    let (got, _) = decode(name);
    let top = ((1u32 << bits) - 1) as f64;
    let want = smooth(bits);
    let errors: Vec<f64> = got.iter().zip(&want).map(|(g, &w)| (g * top - w as f64).abs()).collect();
    let worst = errors.iter().cloned().fold(0.0, f64::max);
    let mean = errors.iter().sum::<f64>() / errors.len() as f64;
    assert!(worst <= max_error + 1e-3, "{name}: max error {worst} stored levels > {max_error}");
    assert!(mean <= max_mean_error, "{name}: mean error {mean} stored levels > {max_mean_error}");
}

#[test]
fn jpeg_lossless_processes_decode_exactly() {
    assert_exact("jpeg_lossless_p14_12bit.dcm", &by_image_range(&textured(12, 0), 1.0, 0.0, false));
    // 16 bits stored, MONOCHROME1.
    assert_exact("jpeg_lossless_sv1_16bit_mono1.dcm", &by_image_range(&textured(16, 0), 1.0, 0.0, true));
}

#[test]
fn jpeg_ls_lossless_and_near_lossless() {
    assert_exact("jpegls_lossless_12bit.dcm", &by_image_range(&textured(12, 0), 1.0, 0.0, false));
    // NEAR = 2: the codec's bound, not a tolerance of ours.
    assert_lossy("jpegls_near_lossless_12bit.dcm", 12, 2.0, 2.0);
}

#[test]
fn jpeg_2000_lossless_and_lossy() {
    assert_exact("j2k_lossless_16bit_mono1.dcm", &by_image_range(&textured(16, 0), 1.0, 0.0, true));
    // Signed 12-bit stored values with a negative rescale slope.
    let signed: Vec<i64> = textured(12, 0).iter().map(|v| v - 2048).collect();
    assert_exact("j2k_lossless_12bit_signed_rescale.dcm", &by_image_range(&signed, -2.0, 100.0, false));
    // PSNR 70 dB of 4095: a few levels.
    assert_lossy("j2k_lossy_12bit.dcm", 12, 12.0, 2.0);
}

#[test]
fn jpeg_baseline_and_extended_8bit() {
    // Quality 95 and 90 on a smooth field; decoders' IDCTs may differ from libjpeg's by a level.
    assert_lossy("jpeg_baseline_8bit.dcm", 8, 4.0, 1.0);
    assert_lossy("jpeg_extended_8bit.dcm", 8, 5.0, 1.2);
}

#[test]
fn multi_frame_files_give_their_first_frame() {
    let (got, frames) = decode("multiframe_jpegls_3frames.dcm");
    assert_eq!(frames, 3);
    let want = by_image_range(&textured(12, 0), 1.0, 0.0, false);
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert!((g - w).abs() < 1e-6, "pixel {i}: got {g}, want {w} (frame 0)");
    }
}

#[test]
fn voi_lut_sequence_is_applied() {
    // LUT Descriptor [3072, 512, 10]: stored values below 512 take the first entry, above 3583 the last.
    let (first, entries, top) = (512i64, 3072i64, 1023.0);
    let lut = |i: i64| ((i as f64 / (entries - 1) as f64).sqrt() * top).round_ties_even();
    let want: Vec<f64> = textured(12, 0).iter().map(|&v| lut((v - first).clamp(0, entries - 1)) / top).collect();
    assert_exact("voi_lut_sequence_12bit.dcm", &want);
}

#[test]
fn uncompressed_deflated_and_rle_files_written_by_pydicom() {
    assert_exact("pydicom_implicit_le_16bit_mono1.dcm", &by_image_range(&textured(16, 1), 1.0, 0.0, true));
    assert_exact("pydicom_explicit_be_12bit.dcm", &by_image_range(&textured(12, 2), 1.0, 0.0, false));
    assert_exact("pydicom_deflated_8bit.dcm", &by_image_range(&textured(8, 1), 1.0, 0.0, false));
    assert_exact("pydicom_rle_12bit.dcm", &by_image_range(&textured(12, 1), 1.0, 0.0, false));
}

#[test]
fn bytes_and_files_decode_alike_with_or_without_preamble() {
    for entry in std::fs::read_dir(fixture("")).unwrap() {
        let path = entry.unwrap().path();
        let from_file = decode_file(&path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(decode_bytes(&bytes).unwrap(), from_file, "{}", path.display());
        // Without the 128-byte preamble, as a stream from a network peer starts.
        assert_eq!(decode_bytes(&bytes[128..]).unwrap(), from_file, "{} without preamble", path.display());
    }
}
