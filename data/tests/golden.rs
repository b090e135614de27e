//! Golden tests of the pixel pipeline: for each encoding and photometric path, a file written with
//! known stored values, decoded, and compared with the values the DICOM standard's formulas give,
//! evaluated here in f64 (PS3.3 C.11.1 modality LUT, C.11.2.1.2 window, C.7.6.3.1.2 MONOCHROME1,
//! C.11.6 presentation LUT shape).

use simclr_data::dicom_writer::{write_image, Encoding, ImageHeader};
use simclr_data::pixels::{decode_file, DecodeError};

const ROWS: u16 = 12;
const COLS: u16 = 10;

fn header(encoding: Encoding, monochrome1: bool, bits_stored: u16) -> ImageHeader {
    ImageHeader {
        patient_id: "P1".into(),
        study_uid: "2.25.1".into(),
        series_uid: "2.25.2".into(),
        sop_uid: "2.25.3".into(),
        encoding,
        monochrome1,
        bits_stored,
        rescale: None,
        window: None,
        presentation_lut_inverse: false,
    }
}

/// Stored values: a ramp over the full range plus flat runs (which RLE encodes as runs).
fn stored(bits: u16) -> Vec<u16> {
    let max = (1u32 << bits) - 1;
    let n = ROWS as usize * COLS as usize;
    (0..n).map(|i| if i % 17 < 5 { (max / 3) as u16 } else { ((i as u32 * 7919) % (max + 1)) as u16 }).collect()
}

/// The standard's pipeline, written independently of the implementation.
fn expected(sv: &[u16], h: &ImageHeader) -> Vec<f64> {
    let (slope, intercept) = h.rescale.unwrap_or((1.0, 0.0));
    let m: Vec<f64> = sv.iter().map(|&v| slope * v as f64 + intercept).collect();
    let voi: Vec<f64> = match h.window {
        Some((c, w)) => m
            .iter()
            .map(|&x| {
                if x <= c - 0.5 - (w - 1.0) / 2.0 {
                    0.0
                } else if x > c - 0.5 + (w - 1.0) / 2.0 {
                    1.0
                } else {
                    ((x - (c - 0.5)) / (w - 1.0) + 0.5).clamp(0.0, 1.0)
                }
            })
            .collect(),
        None => {
            let lo = m.iter().cloned().fold(f64::INFINITY, f64::min);
            let hi = m.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            m.iter().map(|&x| (x - lo) / (hi - lo)).collect()
        }
    };
    let invert = h.monochrome1 || h.presentation_lut_inverse;
    voi.into_iter().map(|y| if invert { 1.0 - y } else { y }).collect()
}

fn check(h: &ImageHeader) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img.dcm");
    let sv = stored(h.bits_stored);
    write_image(&path, h, ROWS, COLS, &sv).unwrap();
    let img = decode_file(&path).unwrap_or_else(|e| panic!("{h:?}: {e}"));
    assert_eq!((img.rows, img.cols, img.frames), (ROWS as u32, COLS as u32, 1));
    for (i, (got, want)) in img.pixels.iter().zip(expected(&sv, h)).enumerate() {
        // f32 output of an f64 formula.
        assert!((*got as f64 - want).abs() < 1e-6, "{h:?} pixel {i}: got {got}, want {want}");
    }
}

#[test]
fn every_encoding_and_bit_depth_decodes_to_the_standard_values() {
    for encoding in Encoding::ALL {
        for bits in [8, 12, 16] {
            for monochrome1 in [false, true] {
                check(&header(encoding, monochrome1, bits));
            }
        }
    }
}

#[test]
fn rescale_window_and_presentation_lut_paths() {
    for encoding in [Encoding::ExplicitVrLittleEndian, Encoding::RleLossless, Encoding::ExplicitVrBigEndian] {
        let mut h = header(encoding, false, 12);
        h.rescale = Some((0.5, -100.0));
        check(&h);
        h.rescale = Some((-1.0, 4095.0)); // negative slope
        check(&h);
        h.window = Some((1500.0, 1200.0)); // clips both ends
        check(&h);
        h.monochrome1 = true;
        check(&h);
        h.monochrome1 = false;
        h.presentation_lut_inverse = true;
        check(&h);
        // MONOCHROME1 with INVERSE (as DX files pair them) inverts once, not twice.
        h.monochrome1 = true;
        check(&h);
    }
}

#[test]
fn bad_files_give_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.dcm");
    std::fs::write(&junk, b"this is not a DICOM file at all").unwrap();
    assert!(matches!(decode_file(&junk), Err(DecodeError::NotDicom(_))));

    // A valid file cut in the middle of its pixel data.
    let good = dir.path().join("good.dcm");
    write_image(&good, &header(Encoding::ExplicitVrLittleEndian, false, 16), ROWS, COLS, &stored(16)).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    let cut = dir.path().join("cut.dcm");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    assert!(decode_file(&cut).is_err());
    let missing = dir.path().join("absent.dcm");
    assert!(matches!(decode_file(&missing), Err(DecodeError::NotDicom(_))));
}
