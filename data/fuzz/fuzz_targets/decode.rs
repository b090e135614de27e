//! Arbitrary bytes through the whole pixel pipeline: parse, decompress, modality LUT, VOI, inversion,
//! resize. Every input must give an image of finite values in [0, 1] or an error, never a panic, an
//! abort or an allocation past libFuzzer's limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simclr_data::pixels::{decode_bytes, resize};

fuzz_target!(|data: &[u8]| {
    // pixels.rs catches third-party decoders' panics (dicom-rs 0.10's RLE decoder indexes out of
    // bounds on some segments) and turns them into per-file errors; libFuzzer's panic hook would abort
    // on those before they are caught. A panic nothing catches still aborts: libfuzzer-sys checks
    // every run's unwinding result.
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    if let Ok(img) = decode_bytes(data) {
        assert_eq!(img.pixels.len(), img.rows as usize * img.cols as usize);
        let small = resize(&img, 16);
        assert!(small.iter().all(|v| (0.0..=1.0).contains(v)), "pixel outside [0, 1]");
    }
});
