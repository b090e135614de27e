//! `import-weights` against checkpoints written by torch itself (tests/python/torch_checkpoints.py):
//! each layout is imported in Rust, then loaded into torchvision's model with `strict=True`, whose
//! features must match the source model's within 1e-4 of their scale. Files that must be refused are
//! refused with an error naming the key or the reason.
//!
//! Needs a Python with torch 2.11 and torchvision (`scripts/setup.sh --python`; SIMCLR_PYTHON names
//! another interpreter), as the worker's torchvision interoperability tests do.

use std::path::{Path, PathBuf};
use std::process::Command;

use simclr_coordinator::import::{import_weights, ImportOptions, Normalisation, SourceFormat};

fn python() -> PathBuf {
    match std::env::var_os("SIMCLR_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"),
    }
}

fn script(mode: &str, dir: &Path) -> String {
    let python = python();
    let output = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/torch_checkpoints.py"))
        .args([mode, dir.to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); run scripts/setup.sh --python", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "torch_checkpoints.py {mode} failed ({}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

fn options(dir: &Path, file: &str, from: SourceFormat, out: &str) -> ImportOptions {
    ImportOptions {
        from,
        input: dir.join(file),
        output: dir.join(out),
        prefix: None,
        strict: false,
        normalisation: None,
    }
}

#[test]
fn checkpoints_written_by_torch_import_with_their_source_models_features_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    println!("{}", script("write", dir));
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 8);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let from = SourceFormat::parse(case["format"].as_str().unwrap()).unwrap();
        let opts = options(dir, case["file"].as_str().unwrap(), from, &format!("{name}.imported.safetensors"));
        let report = import_weights(&opts).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(report.shape.arch, case["arch"].as_str().unwrap(), "{name}");
        assert_eq!(report.shape.width, 1, "{name}");
        assert_eq!(report.classifier, case["classifier"].as_bool().unwrap(), "{name}");
        assert_eq!(report.normalisation, Normalisation::Imagenet, "{name}");
        // torchvision: resnet18 11,689,512 parameters with fc (512 x 1000 + 1000), resnet50 25,557,032.
        let expected = match (report.shape.arch, report.classifier) {
            ("resnet18", true) => 11_689_512,
            ("resnet18", false) => 11_689_512 - 513_000,
            ("resnet50", true) => 25_557_032,
            other => panic!("{name}: unexpected {other:?}"),
        };
        assert_eq!(report.parameters, expected, "{name}");
        match name {
            "solo" => {
                assert_eq!(report.prefix, "state_dict.backbone.");
                // The momentum encoder, projector, classifier and optimiser states are left alone.
                assert!(report.other_tensors > 100, "{report:?}");
            }
            "lightly" => assert_eq!(report.prefix, "backbone."),
            "moco" => assert_eq!(report.prefix, "state_dict.module.encoder_q."),
            _ => {}
        }
        let bytes = std::fs::read(&opts.output).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap();
        assert_eq!(meta["arch"], case["arch"].as_str().unwrap());
        assert_eq!(meta["source_format"], from.name());
        assert_eq!(meta["input_normalisation"], "imagenet");
        assert_eq!(meta["stem"], "repeat3");
    }
    let checked = script("check", dir);
    println!("{checked}");
    assert_eq!(checked.lines().count(), cases.len());
    refusals(dir);
}

/// What cannot be imported is refused, naming the key or the reason (the same files: writing them
/// takes most of the test's time).
fn refusals(dir: &Path) {
    let err = |o: ImportOptions| import_weights(&o).unwrap_err().to_string();

    let e = err(ImportOptions {
        prefix: Some("state_dict.projector.".into()),
        ..options(dir, "solo.ckpt", SourceFormat::SoloLearn, "x.safetensors")
    });
    assert!(e.contains("state_dict.projector.") && e.contains("state_dict.momentum_backbone."), "{e}");

    // The momentum encoder on request.
    let report = import_weights(&ImportOptions {
        prefix: Some("state_dict.momentum_backbone.".into()),
        ..options(dir, "solo.ckpt", SourceFormat::SoloLearn, "momentum.safetensors")
    })
    .unwrap();
    assert_eq!(report.prefix, "state_dict.momentum_backbone.");

    // Lightning needs a state_dict entry.
    let e = err(options(dir, "lightly.pth", SourceFormat::Lightning, "x.safetensors"));
    assert!(e.contains("state_dict") && e.contains("--from torchvision"), "{e}");

    // Tensors under the encoder's prefix that are no ResNet's: left out with a report, or refused by --strict.
    let report = import_weights(&options(dir, "extra18.pth", SourceFormat::Torchvision, "e.safetensors")).unwrap();
    assert_eq!(report.leftovers, vec!["conv1.bias".to_string()]);
    let e =
        err(ImportOptions { strict: true, ..options(dir, "extra18.pth", SourceFormat::Torchvision, "s.safetensors") });
    assert!(e.contains("--strict") && e.contains("conv1.bias"), "{e}");
    let strict =
        ImportOptions { strict: true, ..options(dir, "torchvision18.pth", SourceFormat::Torchvision, "s.safetensors") };
    import_weights(&strict).unwrap();

    // Two encoders and no rule for this format to choose: the user names one.
    let e = err(options(dir, "solo.ckpt", SourceFormat::Torchvision, "x.safetensors"));
    assert!(e.contains("several ResNets") && e.contains("--prefix"), "{e}");

    // A truncated archive, and something that is no checkpoint at all.
    let bytes = std::fs::read(dir.join("torchvision18.pth")).unwrap();
    std::fs::write(dir.join("cut.pth"), &bytes[..bytes.len() / 2]).unwrap();
    let e = err(options(dir, "cut.pth", SourceFormat::Torchvision, "x.safetensors"));
    assert!(e.contains("cut.pth"), "{e}");
    let bytes = std::fs::read(dir.join("legacy50.pth")).unwrap();
    std::fs::write(dir.join("cut_legacy.pth"), &bytes[..bytes.len() - 1000]).unwrap();
    let e = err(options(dir, "cut_legacy.pth", SourceFormat::Torchvision, "x.safetensors"));
    assert!(e.contains("cut_legacy.pth") && e.contains("truncated"), "{e}");
    // A TensorFlow checkpoint (prefix, index or data shard) is named as such.
    let tf = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tf/saver");
    for name in ["model.ckpt", "model.ckpt.index", "model.ckpt.data-00000-of-00001"] {
        let e =
            err(ImportOptions { input: tf.join(name), ..options(dir, "", SourceFormat::Torchvision, "x.safetensors") });
        assert!(e.contains("a TensorFlow checkpoint") && e.contains(name), "{e}");
    }
    std::fs::write(dir.join("notes.txt"), "not a checkpoint").unwrap();
    let e = err(options(dir, "notes.txt", SourceFormat::Torchvision, "x.safetensors"));
    assert!(e.contains("notes.txt") && e.contains("neither"), "{e}");
    assert!(!dir.join("x.safetensors").exists(), "a refused import must not leave a file");
}
