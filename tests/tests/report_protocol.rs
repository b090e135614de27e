//! The reference report's protocol (configs/report.toml) end to end on the synthetic data, with a
//! SimCLR v2 selective-kernel encoder written by TensorFlow (the fixture of
//! worker/tests/simclr_tf_encoders.rs: SimCLR's layout at its smallest) and imported by
//! `simclr-coordinator import-weights --from simclr-tf`: the real binaries, 2 workers, the report's
//! whole probe grid. Only the data size and the architecture's size differ from the shipped file.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use simclr_common::{ExitStatus, JobConfig};
use simclr_tests::{binaries_dir, exit_code};

/// A TF2 checkpoint of SimCLR v2's ResNet with selective kernels, one bottleneck per stage.
fn tensorflow_checkpoint() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/simclr_tf/tf2_sk1/ckpt-1.index")
}

fn coordinator<S: AsRef<OsStr>>(args: &[S], cache: &Path) -> anyhow::Result<(i32, String)> {
    let out = std::process::Command::new(binaries_dir()?.join("simclr-coordinator"))
        .args(args)
        .env("SIMCLR_CACHE_DIR", cache)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()?;
    let text = String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    Ok((exit_code(out.status), text))
}

#[test]
fn the_report_protocol_runs_on_an_imported_simclr_v2_tensorflow_encoder() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dir = dir.path();
    let cache = dir.join("cache");
    let encoder = dir.join("tiny.safetensors");
    let os = |s: &str| OsString::from(s);
    let import = |from: &str, input: &Path| {
        vec![
            os("import-weights"),
            os("--from"),
            os(from),
            os("--in"),
            input.into(),
            os("--out"),
            encoder.clone().into(),
        ]
    };
    let (code, log) = coordinator(&import("simclr-tf", &tensorflow_checkpoint()), &cache)?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("encoder imported") && log.contains("arch=\"tiny_bottleneck\""), "{log}");

    // A wrong format name is a usage error naming the flag's values; a missing file names the file.
    let bad = [
        os("import-weights"),
        os("--from"),
        os("keras"),
        os("--in"),
        tensorflow_checkpoint().into(),
        os("--out"),
        os("x"),
    ];
    let (code, log) = coordinator(&bad, &cache)?;
    assert_eq!(code, ExitStatus::Usage.code(), "{log}");
    assert!(log.contains("keras") && log.contains("simclr-tf"), "{log}");
    let missing = dir.join("nope.pth");
    let (code, log) = coordinator(&import("torchvision", &missing), &cache)?;
    assert_eq!(code, ExitStatus::DataError.code(), "{log}");
    assert!(log.contains("nope.pth"), "{log}");

    // The shipped protocol, on 40 synthetic studies with the tiny architecture.
    let mut config = JobConfig::from_toml(include_str!("../../configs/report.toml"), "configs/report.toml")?;
    config.data.synthetic_studies = 40;
    config.data.synthetic_size = 64;
    config.pretrain.arch = simclr_common::pretrain::Arch::TinyBottleneck;
    let config_path = dir.join("report.toml");
    std::fs::write(&config_path, config.to_toml())?;
    let run_dir = dir.join("run");
    let dev = |config_path: &Path, run_dir: &Path| {
        let args = [
            os("dev"),
            os("--workers"),
            os("2"),
            os("--config"),
            config_path.into(),
            os("--run-dir"),
            run_dir.into(),
            os("--probe-encoder"),
            encoder.clone().into(),
        ];
        coordinator(&args, &cache)
    };
    let (code, log) = dev(&config_path, &run_dir)?;
    assert_eq!(code, 0, "{log}");
    let results: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("results.json"))?)?;
    let rows = results.as_array().expect("results.json is a list");
    // Table 3.2's grid (2 x 2 x 3, no linear probe), 3 seeds, the imported and a random encoder.
    assert_eq!(rows.len(), 12 * 3 * 2, "{results}");
    for row in rows {
        assert!([100, 500].contains(&row["task"]["hidden"].as_i64().unwrap()), "{row}");
    }
    let dataset = std::fs::read_to_string(run_dir.join("dataset.json"))?;
    assert!(dataset.contains("Typical Appearance"), "{dataset}");
    assert!(!run_dir.join("checkpoints").exists(), "nothing was pretrained");

    // The file says its encoder takes pixels in [0, 1] and has selective kernels: a job that would
    // normalise them, or build torchvision's layout, is refused naming the key.
    let mut imagenet = config.clone();
    imagenet.pretrain.input_normalisation = simclr_common::pretrain::InputNormalisation::Imagenet;
    std::fs::write(&config_path, imagenet.to_toml())?;
    let (code, log) = dev(&config_path, &dir.join("run2"))?;
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("set pretrain.input_normalisation = \"none\""), "{log}");
    config.pretrain.variant = simclr_common::pretrain::Variant::Torchvision;
    std::fs::write(&config_path, config.to_toml())?;
    let (code, log) = dev(&config_path, &dir.join("run3"))?;
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("set pretrain.variant = \"simclr_tf_sk\""), "{log}");
    Ok(())
}
