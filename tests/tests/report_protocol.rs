//! The reference report's protocol (configs/report.toml) end to end on the synthetic data, with an
//! encoder written by torchvision and imported by `simclr-coordinator import-weights`: the real
//! binaries, 2 workers, the report's whole probe grid. Only the data size and the architecture (a
//! torchvision ResNet shrunk to a few thousand parameters) differ from the shipped file.

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::Stdio;

use simclr_common::{ExitStatus, JobConfig};
use simclr_tests::{binaries_dir, exit_code};

/// torchvision's own ResNet class with BasicBlocks, one per stage, 2/4/8/16 channels (our "tiny"),
/// ImageNet-style weights saved with torch.save.
const WRITE_TINY: &str = r#"
import sys, torch, torchvision
from torchvision.models.resnet import ResNet, BasicBlock
torch.manual_seed(0)
m = ResNet(BasicBlock, [1, 1, 1, 1])
m.inplanes = 2
m.conv1 = torch.nn.Conv2d(3, 2, 7, 2, 3, bias=False)
m.bn1 = torch.nn.BatchNorm2d(2)
m.layer1 = m._make_layer(BasicBlock, 2, 1)
m.layer2 = m._make_layer(BasicBlock, 4, 1, stride=2)
m.layer3 = m._make_layer(BasicBlock, 8, 1, stride=2)
m.layer4 = m._make_layer(BasicBlock, 16, 1, stride=2)
m.fc = torch.nn.Linear(16, 10)
with torch.no_grad():
    m.train()
    m(torch.rand(8, 3, 64, 64))
torch.save(m.state_dict(), sys.argv[1])
"#;

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
fn the_report_protocol_runs_on_an_imported_torchvision_encoder() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let dir = dir.path();
    let cache = dir.join("cache");
    let pth = dir.join("tiny.pth");
    let Some(out) = simclr_tests::run_python("torchvision", WRITE_TINY, &[pth.as_os_str()], &[])? else {
        panic!("no Python with torchvision: run scripts/setup.sh --python");
    };
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

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
    let (code, log) = coordinator(&import("torchvision", &pth), &cache)?;
    assert_eq!(code, 0, "{log}");
    assert!(log.contains("encoder imported") && log.contains("arch=\"tiny\""), "{log}");

    // A wrong format name is a usage error naming the flag's values; a missing file names the file.
    let bad = [os("import-weights"), os("--from"), os("keras"), os("--in"), pth.clone().into(), os("--out"), os("x")];
    let (code, log) = coordinator(&bad, &cache)?;
    assert_eq!(code, ExitStatus::Usage.code(), "{log}");
    assert!(log.contains("keras") && log.contains("solo-learn"), "{log}");
    let missing = dir.join("nope.pth");
    let (code, log) = coordinator(&import("torchvision", &missing), &cache)?;
    assert_eq!(code, ExitStatus::DataError.code(), "{log}");
    assert!(log.contains("nope.pth"), "{log}");

    // The shipped protocol, on 40 synthetic studies with the tiny architecture.
    let mut config = JobConfig::from_toml(include_str!("../../configs/report.toml"), "configs/report.toml")?;
    config.data.synthetic_studies = 40;
    config.data.synthetic_size = 64;
    config.pretrain.arch = simclr_common::pretrain::Arch::Tiny;
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

    // The file says its encoder expects ImageNet-normalised inputs: a job that would feed it raw
    // pixels is refused, naming the key.
    config.pretrain.input_normalisation = simclr_common::pretrain::InputNormalisation::None;
    std::fs::write(&config_path, config.to_toml())?;
    let (code, log) = dev(&config_path, &dir.join("run2"))?;
    assert_ne!(code, 0, "{log}");
    assert!(log.contains("set pretrain.input_normalisation = \"imagenet\""), "{log}");
    Ok(())
}
