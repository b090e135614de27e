//! PyTorch reads what we save and we read what PyTorch saves: our ResNet-18 and ResNet-50 encoders
//! load into torchvision 0.26's models with `strict=True` and give the same features (within 1e-4),
//! and torchvision's own weights (classifier included) load into ours with the same result.
//!
//! Needs a Python with torch 2.11 and torchvision: `scripts/setup.sh --python` puts them into .venv
//! (scripts/test.sh does); SIMCLR_PYTHON names another interpreter.

use std::path::{Path, PathBuf};
use std::process::Command;

use simclr_worker::engine::model::{load_encoder, save_encoder, Arch, Encoder, EncoderConfig, Stem};
use tch::{nn, Device, Kind, Tensor};

fn python() -> PathBuf {
    match std::env::var_os("SIMCLR_PYTHON") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python"),
    }
}

fn relative_error(a: &Tensor, b: &Tensor) -> f64 {
    let scale = b.abs().max().double_value(&[]).max(1.0);
    (a - b).abs().max().double_value(&[]) / scale
}

fn check(arch: Arch, name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ours_path = dir.path().join("ours.safetensors");
    let io_path = dir.path().join("io.safetensors");

    tch::manual_seed(7);
    let config = EncoderConfig::new(arch, 1, Stem::Repeat3);
    let vs = nn::VarStore::new(Device::Cpu);
    let encoder = Encoder::new(&vs.root(), config);
    // A training-mode pass first, so that the saved running statistics are not the initial ones.
    let _ = encoder.forward(&Tensor::rand([4, 1, 64, 64], (Kind::Float, Device::Cpu)), true);
    save_encoder(&vs, &encoder, &ours_path).unwrap();
    let images = Tensor::rand([3, 1, 64, 64], (Kind::Float, Device::Cpu));
    let features = tch::no_grad(|| encoder.forward(&images, false));
    Tensor::write_safetensors(&[("images", &images), ("features", &features)], &io_path).unwrap();

    let python = python();
    let output = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/torchvision_interop.py"))
        .args([name, ours_path.to_str().unwrap(), io_path.to_str().unwrap(), dir.path().to_str().unwrap()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} ({e}); run scripts/setup.sh --python", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{name}: PyTorch side failed ({}):\n{stdout}\n{}\n(scripts/setup.sh --python installs torch and torchvision)",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    println!("{stdout}");

    // torchvision's weights into a fresh encoder of ours: the same features as torchvision's.
    tch::manual_seed(8);
    let mut vs2 = nn::VarStore::new(Device::Cpu);
    let encoder2 = Encoder::new(&vs2.root(), config);
    load_encoder(&mut vs2, &encoder2, &dir.path().join("torchvision.safetensors")).unwrap();
    let theirs = Tensor::read_safetensors(dir.path().join("torchvision_features.safetensors")).unwrap();
    let ours = tch::no_grad(|| encoder2.forward(&images, false));
    let error = relative_error(&ours, &theirs[0].1);
    assert!(error <= 1e-4, "{name}: torchvision weights in our encoder differ by {error}");
}

#[test]
fn resnet18_round_trips_through_torchvision() {
    check(Arch::Resnet18, "resnet18");
}

#[test]
fn resnet50_round_trips_through_torchvision() {
    check(Arch::Resnet50, "resnet50");
}

/// One whole training step (forward in training mode with batch statistics, NT-Xent, backward, the
/// optimiser) against the same step in PyTorch from the same weights (tests/python/one_step.py): SGD
/// with momentum and a 2-layer head, and LARS with weight decay and SimCLR v2's 3-layer head with
/// BatchNorm. The loss agrees within 1e-5, and the update of every variable (after - before, running
/// statistics included) within 1e-3 of that variable's largest update element.
#[test]
fn one_step_matches_pytorch() {
    use simclr_worker::engine::augment::AugmentConfig;
    use simclr_worker::engine::train::{LrScalingName, OptimizerName, PretrainConfig, Trainer};
    let base = PretrainConfig {
        arch: Arch::Resnet18,
        head_out: 16,
        batch_size: 4,
        epochs: 10,
        input_size: 32,
        augment: AugmentConfig::disabled(),
        lr_scaling: LrScalingName::None,
        warmup_epochs: 0.0,
        temperature: 0.5,
        seed: 11,
        ..PretrainConfig::default()
    };
    let cases = [
        PretrainConfig { optimizer: OptimizerName::Sgd, base_lr: 0.1, weight_decay: 0.0, ..base.clone() },
        PretrainConfig {
            optimizer: OptimizerName::Lars,
            base_lr: 1.0,
            weight_decay: 1e-4,
            head_layers: 3,
            head_batch_norm: true,
            head_hidden: 64,
            ..base.clone()
        },
    ];
    for config in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut trainer = Trainer::new(config.clone(), 4, Device::Cpu).unwrap();
        let before = trainer.save_checkpoint(&dir.path().join("before")).unwrap();
        let images = simclr_worker::engine::model::with_torch_seed(5, || {
            Tensor::rand([4, 1, 32, 32], (Kind::Float, Device::Cpu))
        });
        let stats = trainer.train_step(&images, &[0, 1, 2, 3]).unwrap();
        let after = trainer.save_checkpoint(&dir.path().join("after")).unwrap();
        let io_path = dir.path().join("io.safetensors");
        Tensor::write_safetensors(
            &[
                ("images", images.shallow_clone()),
                ("lr", Tensor::from(stats.lr)),
                ("tau", Tensor::from(config.temperature)),
                ("loss", Tensor::from(stats.loss)),
            ],
            &io_path,
        )
        .unwrap();
        let settings = serde_json::json!({
            "optimizer": match config.optimizer {
                OptimizerName::Sgd => "sgd",
                OptimizerName::Lars => "lars",
                other => panic!("no PyTorch reference for {other:?}"),
            },
            "momentum": config.momentum,
            "weight_decay": config.weight_decay,
            "trust_coefficient": 0.001,
            "head_layers": config.head_layers,
            "head_batch_norm": config.head_batch_norm,
        });
        let python = python();
        let output = Command::new(&python)
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/one_step.py"))
            .args([before.to_str().unwrap(), after.to_str().unwrap(), io_path.to_str().unwrap()])
            .arg(settings.to_string())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {} ({e}); run scripts/setup.sh --python", python.display()));
        let stdout = String::from_utf8_lossy(&output.stdout);
        println!("{stdout}");
        assert!(
            output.status.success(),
            "the step differs from PyTorch's ({}):\n{stdout}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
