//! Colour images and data sets without File Meta, read from files that pydicom 3.0.1 and GDCM 3.2.6
//! wrote, and from pydicom's own test files (scripts/make_messy_fixtures.py). With `data.color = "luminance"` every colour file must give
//! the luma pydicom's own reading gives (`expected.json`: pydicom's pixels, YBR converted to RGB by
//! pydicom's `convert_color_space`, then 0.299 R + 0.587 G + 0.114 B); with the default it is refused
//! by name, at index time as at decode time.

use std::path::PathBuf;

use simclr_common::config::ColorMode;
use simclr_data::guard::Extent;
use simclr_data::index::{index_tree, BadKind};
use simclr_data::pixels::{decode_file, decode_file_with, open_bytes, string, DecodeError, DecodeOptions};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/messy").join(name)
}

const LUMINANCE: DecodeOptions = DecodeOptions { color: ColorMode::Luminance, accept_no_meta: false };

#[test]
fn colour_files_become_the_luma_pydicom_reads() {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("expected.json")).unwrap()).unwrap();
    let files = expected["files"].as_object().unwrap();
    assert!(files.len() >= 6, "{:?}", files.keys());
    for (name, want) in files {
        let img = decode_file_with(&fixture(name), LUMINANCE).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(
            (img.rows as u64, img.cols as u64),
            (want["rows"].as_u64().unwrap(), want["cols"].as_u64().unwrap())
        );
        let want: Vec<f64> = want["luma"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(img.pixels.len(), want.len(), "{name}");
        // Uncompressed files: the same 8-bit RGB as pydicom, so the same luma up to float rounding.
        // JPEG baseline: two decoders (jpeg-decoder here, libjpeg under pydicom) may differ by one
        // level per channel after their inverse DCT and colour conversion, so by at most 1/255 in luma.
        let tolerance = if name.contains("jpeg") { 1.0 / 255.0 + 1e-6 } else { 1e-6 };
        let worst = img.pixels.iter().zip(&want).map(|(&g, &w)| (f64::from(g) - w).abs()).fold(0.0, f64::max);
        println!("{name}: largest difference from pydicom {worst:.2e} (tolerance {tolerance:.2e})");
        assert!(worst <= tolerance, "{name}: largest difference from pydicom {worst}");
    }
}

#[test]
fn colour_is_refused_by_default_and_named_at_index_time() {
    let err = decode_file(&fixture("pydicom_ybr_full.dcm")).unwrap_err();
    assert!(matches!(err, DecodeError::Color(ref p) if p == "YBR_FULL"), "{err}");
    assert!(err.to_string().contains("data.color = \"luminance\""), "{err}");

    let dir = tempfile::tempdir().unwrap();
    for name in ["pydicom_rgb.dcm", "gdcm_jpeg_baseline_rgb.dcm", "pydicom_ybr_full_422.dcm"] {
        std::fs::copy(fixture(name), dir.path().join(name)).unwrap();
    }
    let index = index_tree(dir.path(), DecodeOptions::default(), &|_, _| {}).unwrap();
    assert!(index.images.is_empty());
    assert_eq!(index.bad.len(), 3);
    assert!(index.bad.iter().all(|b| b.kind == BadKind::Colour && b.reason.contains("luminance")), "{:?}", index.bad);
    let index = index_tree(dir.path(), LUMINANCE, &|_, _| {}).unwrap();
    assert_eq!((index.images.len(), index.bad.len()), (3, 0), "{:?}", index.bad);
}

#[test]
fn a_data_set_without_file_meta_is_read_only_when_asked() {
    let path = fixture("pydicom_no_meta.dcm");
    let err = decode_file(&path).unwrap_err();
    assert_eq!(err, DecodeError::NoFileMeta);
    assert!(err.to_string().contains("data.accept_no_meta = true"), "{err}");
    let img = decode_file_with(&path, DecodeOptions { accept_no_meta: true, ..Default::default() }).unwrap();
    // scripts/make_messy_fixtures.py: stored (97 r + 31 c) mod 4096, no window: the image's own range.
    let stored: Vec<f64> = (0..24).flat_map(|r| (0..32).map(move |c| f64::from((r * 97 + c * 31) % 4096))).collect();
    let (lo, hi) = stored.iter().fold((f64::MAX, f64::MIN), |(l, h), &v| (l.min(v), h.max(v)));
    for (i, (&got, want)) in img.pixels.iter().zip(stored.iter().map(|v| (v - lo) / (hi - lo))).enumerate() {
        assert!((f64::from(got) - want).abs() < 1e-6, "pixel {i}: {got} vs {want}");
    }

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&path, dir.path().join("old.dcm")).unwrap();
    std::fs::write(dir.path().join("notes.bin"), b"not a data set at all, nor DICOM").unwrap();
    let index = index_tree(dir.path(), DecodeOptions::default(), &|_, _| {}).unwrap();
    let kinds: Vec<(String, BadKind)> = index.bad.iter().map(|b| (b.path.display().to_string(), b.kind)).collect();
    assert_eq!(kinds, [("notes.bin".into(), BadKind::Unreadable), ("old.dcm".into(), BadKind::NoFileMeta)]);
    let index =
        index_tree(dir.path(), DecodeOptions { accept_no_meta: true, ..Default::default() }, &|_, _| {}).unwrap();
    assert_eq!(index.images.len(), 1, "{:?}", index.bad);
    assert_eq!(index.images[0].study_uid, "2.25.7101");
}

/// pydicom's own test files without File Meta: implicit VR little endian, explicit VR little and big
/// endian. With `accept_no_meta` each is read in the syntax its first element shows, with the UIDs
/// pydicom reads with `force=True` (and refused for having no pixel data, as pydicom finds none);
/// without, each is refused by name; `no_meta.dcm`, which pydicom cannot read either, is unreadable.
#[test]
fn pydicoms_files_without_file_meta_read_as_pydicom_reads_them() {
    let expected: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture("expected.json")).unwrap()).unwrap();
    let accept = DecodeOptions { accept_no_meta: true, ..Default::default() };
    for (name, want) in expected["no_meta"].as_object().unwrap() {
        let bytes = std::fs::read(fixture("pydicom_test_files").join(name)).unwrap();
        let refused = open_bytes(&bytes, Extent::Everything, DecodeOptions::default()).unwrap_err();
        match want["sop_uid"].as_str() {
            Some(sop) => {
                assert_eq!(refused, DecodeError::NoFileMeta, "{name}");
                let (obj, pixel_data) =
                    open_bytes(&bytes, Extent::Everything, accept).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(string(&obj, dicom_dictionary_std::tags::SOP_INSTANCE_UID).as_deref(), Some(sop), "{name}");
                assert_eq!(
                    string(&obj, dicom_dictionary_std::tags::STUDY_INSTANCE_UID).as_deref(),
                    want["study_uid"].as_str(),
                    "{name}"
                );
                assert_eq!(pixel_data, simclr_data::guard::PixelData::Absent, "{name}");
                assert_eq!(
                    decode_file_with(&fixture("pydicom_test_files").join(name), accept),
                    Err(DecodeError::NoPixelData)
                );
            }
            None => {
                assert!(matches!(refused, DecodeError::NotDicom(_)), "{name}: {refused}");
                assert!(
                    matches!(open_bytes(&bytes, Extent::Everything, accept), Err(DecodeError::NotDicom(_))),
                    "{name}"
                );
            }
        }
    }
    let index = index_tree(&fixture("pydicom_test_files"), accept, &|_, _| {}).unwrap();
    let kinds: Vec<BadKind> = index.bad.iter().map(|b| b.kind).collect();
    // ExplVR_BigEndNoMeta, ExplVR_LitEndNoMeta, no_meta, rtstruct (path order).
    assert_eq!(kinds, [BadKind::NoPixelData, BadKind::NoPixelData, BadKind::Unreadable, BadKind::NoPixelData]);
}
