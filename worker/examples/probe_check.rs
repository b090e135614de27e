//! A quick look at whether an encoder's features carry a label, before the probe sweep runs: the
//! encoder file against a randomly initialised encoder of the same architecture, each through a linear
//! probe and two MLP probes (3 seeds each), on the study-level split the job makes (85/15, seed 0).
//! Images come from the decode cache (decoded on first use).
//!
//! Usage: probe_check DATASET_ROOT ENCODER.safetensors [ARCH=resnet18] [TARGET="Typical Appearance"]
//!        [IMAGE_SIZE=64]
//! e.g. after the demo: `cargo run --release -p simclr-worker --example probe_check --
//!      ~/.cache/simclr-cluster/synth-v1-n400-s0-p256 runs/demo/encoder.safetensors`

use std::path::{Path, PathBuf};

use simclr_common::metrics::mean_std;
use simclr_data::cache::{CacheKey, DecodeCache};
use simclr_data::dataset::{split_studies, Dataset};
use simclr_data::index::index_tree;
use simclr_data::labels::LabelTable;
use simclr_worker::engine::model::{load_encoder, with_torch_seed, Arch, Encoder, EncoderConfig, Stem};
use simclr_worker::probe::{embed, train_probe, ProbeConfig};
use tch::{nn, Device, Tensor};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: probe_check DATASET_ROOT ENCODER.safetensors [ARCH] [TARGET] [IMAGE_SIZE]");
        std::process::exit(2);
    }
    let root = PathBuf::from(&args[1]);
    let encoder_path = PathBuf::from(&args[2]);
    let arch = match args.get(3).map_or("resnet18", String::as_str) {
        "resnet18" => Arch::Resnet18,
        "resnet34" => Arch::Resnet34,
        "resnet50" => Arch::Resnet50,
        "tiny" => Arch::Tiny,
        other => fail(format!("architecture '{other}' (expected resnet18, resnet34, resnet50 or tiny)")),
    };
    let target = args.get(4).cloned().unwrap_or_else(|| "Typical Appearance".into());
    let size: u32 = args.get(5).map_or(64, |s| s.parse().unwrap_or_else(|_| fail(format!("image size '{s}'"))));

    let index = index_tree(&root, Default::default(), &|_, _| {}).unwrap_or_else(|e| fail(e.to_string()));
    let labels = LabelTable::load(&root).unwrap_or_else(|e| fail(e.to_string()));
    let dataset = Dataset::assemble(index, &labels);
    let column = dataset
        .label_columns
        .iter()
        .position(|c| *c == target)
        .unwrap_or_else(|| fail(format!("no label column '{target}' (columns: {:?})", dataset.label_columns)));
    let split = split_studies(&dataset.studies, 0.15, 0.0, 0).unwrap_or_else(|e| fail(e.to_string()));
    let cache = DecodeCache::open(&simclr_data::cache_dir().join("decoded")).unwrap_or_else(|e| fail(e.to_string()));
    let (train_x, train_y) = images(&dataset, &split.train, column, &root, &cache, size);
    let (test_x, test_y) = images(&dataset, &split.test, column, &root, &cache, size);
    println!(
        "{} train / {} test images, test positive rate {:.3}",
        train_y.size()[0],
        test_y.size()[0],
        test_y.mean(tch::Kind::Float).double_value(&[])
    );
    println!("| encoder | probe | test AUC (mean ± sd over 3 seeds) | test accuracy |");
    println!("|---|---|---|---|");
    for which in ["file", "random"] {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let encoder = with_torch_seed(0, || Encoder::new(&vs.root(), EncoderConfig::new(arch, 1, Stem::Repeat3)));
        if which == "file" {
            load_encoder(&mut vs, &encoder, &encoder_path).unwrap_or_else(|e| fail(e));
        }
        let features_train = embed(&encoder, &train_x, 64, Device::Cpu);
        let features_test = embed(&encoder, &test_x, 64, Device::Cpu);
        for (name, hidden, dropout) in [("linear", 0, 0.0), ("MLP 100", 100, 0.0), ("MLP 500, dropout 0.2", 500, 0.2)] {
            let (mut aucs, mut accs) = (Vec::new(), Vec::new());
            for seed in 0..3 {
                let config = ProbeConfig { hidden, dropout, epochs: 25, seed, bootstrap: 0, ..ProbeConfig::default() };
                let r = train_probe(&features_train, &train_y, &features_test, &test_y, &config)
                    .unwrap_or_else(|e| fail(e));
                aucs.push(r.classes[0].auc.unwrap_or(f64::NAN));
                accs.push(r.classes[0].accuracy);
            }
            let ((auc, auc_sd), (acc, acc_sd)) = (mean_std(&aucs), mean_std(&accs));
            let label = if which == "file" { encoder_path.display().to_string() } else { "random init".into() };
            println!("| {label} | {name} | {auc:.3} ± {auc_sd:.3} | {acc:.3} ± {acc_sd:.3} |");
        }
    }
}

/// The labelled images of `studies` (pixels N x 1 x S x S, labels N x 1).
fn images(
    dataset: &Dataset,
    studies: &[usize],
    column: usize,
    root: &Path,
    cache: &DecodeCache,
    size: u32,
) -> (Tensor, Tensor) {
    let (mut pixels, mut ys) = (Vec::new(), Vec::new());
    for study in studies.iter().map(|&s| &dataset.studies[s]) {
        let Some(labels) = &study.labels else { continue };
        for img in study.images.iter().map(|&i| &dataset.index.images[i]) {
            let key = CacheKey {
                path: img.path.clone(),
                sop_uid: img.sop_uid.clone(),
                file_size: img.file_size,
                modified_ns: u64::try_from(img.modified_ns).unwrap_or(u64::MAX),
                image_size: size,
            };
            match cache.get_or_decode(root, &key) {
                Ok((p, _)) => {
                    pixels.extend(p);
                    ys.push(labels[column]);
                }
                Err(e) => eprintln!("skipping {}: {e}", img.path.display()),
            }
        }
    }
    let n = ys.len() as i64;
    let s = size as i64;
    (Tensor::from_slice(&pixels).view([n, 1, s, s]), Tensor::from_slice(&ys).view([n, 1]))
}

fn fail(message: impl std::fmt::Display) -> ! {
    eprintln!("probe_check: {message}");
    std::process::exit(1)
}
