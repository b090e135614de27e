//! The TensorFlow checkpoint reader against checkpoints TensorFlow 2.21 wrote
//! (scripts/make_tf_checkpoint_fixtures.py; the fixtures are committed, so no TensorFlow is needed):
//! every variable TensorFlow reads back, with its shape and values, from a TF2 object-based checkpoint
//! whose index spans several blocks and from a TF1 Saver checkpoint. A flipped byte in a shard is a
//! checksum error naming the variable; a missing shard names the file.

use std::path::{Path, PathBuf};

use simclr_coordinator::import::tf_bundle::{bundle_prefix, read_bundle};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tf")
}

#[test]
fn every_variable_tensorflow_wrote_is_read_with_its_shape_and_values() {
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap()).unwrap();
    let variables = expected["variables"].as_object().unwrap();
    let object = read_bundle(&fixtures().join("object/ckpt")).unwrap();
    let saver = read_bundle(&bundle_prefix(&fixtures().join("saver/model.ckpt.index")).unwrap()).unwrap();
    assert_eq!(object.len() + saver.len(), variables.len(), "the object graph (a string) is left out");
    for (key, want) in variables {
        let (which, name) = key.split_once(':').unwrap();
        let got = if which == "object" { &object[name] } else { &saver[name] };
        let shape: Vec<usize> =
            want["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
        assert_eq!(got.shape, shape, "{key}");
        let values: Vec<f64> = want["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        let ours: Vec<f64> = if got.dtype.is_float() {
            got.to_f32().iter().map(|&v| v as f64).collect()
        } else {
            (0..got.numel()).map(|i| got.int_at(i) as f64).collect()
        };
        for (a, b) in ours.iter().zip(&values) {
            // float64 variables are narrowed to float32 on the way out.
            assert!((a - b).abs() <= 1e-6 * b.abs().max(1.0), "{key}: {a} vs {b}");
        }
    }
    assert!(object.contains_key("model/conv/.ATTRIBUTES/VARIABLE_VALUE"));
    assert_eq!(saver["base_model/conv2d/kernel"].shape, vec![7, 7, 3, 2]);
}

#[test]
fn a_corrupt_or_missing_shard_is_named() {
    let dir = tempfile::tempdir().unwrap();
    for f in ["ckpt.index", "ckpt.data-00000-of-00001"] {
        std::fs::copy(fixtures().join("object").join(f), dir.path().join(f)).unwrap();
    }
    let data = dir.path().join("ckpt.data-00000-of-00001");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[20] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();
    let e = read_bundle(&dir.path().join("ckpt")).unwrap_err().to_string();
    assert!(e.contains("checksum mismatch") && e.contains("ATTRIBUTES"), "{e}");
    std::fs::remove_file(&data).unwrap();
    let e = read_bundle(&dir.path().join("ckpt")).unwrap_err().to_string();
    assert!(e.contains("ckpt.data-00000-of-00001"), "{e}");
    std::fs::write(dir.path().join("ckpt.index"), b"not an index at all, but long enough to have a footer....")
        .unwrap();
    let e = read_bundle(&dir.path().join("ckpt")).unwrap_err().to_string();
    assert!(e.contains("ckpt.index") && e.contains("magic"), "{e}");
}
