//! One SimCLR training step (two views of a batch, encoder, projection head, NT-Xent, backward, LARS)
//! in images per second, for ResNet-18 and ResNet-50 at 64x64 and 224x224, and the augmentations
//! alone. `scripts/bench_step.sh` runs it beside the same step in PyTorch at the same thread count.
//!
//! cargo bench -p simclr-worker --bench simclr_step -- [THREADS] [STEPS] [DEVICE] [PRECISION]
//!
//! DEVICE is `cpu` (default) or `cuda:K`; on a GPU the batches are the realistic ones (256 images) and
//! the augmentation table is skipped (it runs on the CPU either way). PRECISION (`pretrain.precision`)
//! defaults to tf32: float32 tensors with cuDNN's TF32 convolutions, PyTorch's own default, which
//! `scripts/bench_step_pytorch.py` runs (the CPU computes fp32 either way).

use std::time::Instant;

use simclr_worker::engine::augment::{two_views, AugmentConfig};
use simclr_worker::engine::model::Arch;
use simclr_worker::engine::train::{PretrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let threads: i32 = args.first().and_then(|s| s.parse().ok()).unwrap_or(2);
    let steps: u32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(2);
    let spec = args.get(2).map_or("cpu", String::as_str);
    let precision: simclr_worker::engine::numerics::Precision = match args.get(3).map_or("tf32", String::as_str).parse()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("simclr_step: {e}");
            std::process::exit(2);
        }
    };
    let device = match simclr_worker::session::device::Device::parse(spec).and_then(|d| d.open()) {
        Ok(device) => device,
        Err(e) => {
            eprintln!("simclr_step: {e}");
            std::process::exit(2);
        }
    };
    tch::set_num_threads(threads);
    let on_cpu = device == Device::Cpu;
    if on_cpu {
        augmentation_throughput(steps);
        println!();
    }
    println!("| model | input | batch (images) | step time (s) | images/s |");
    println!("|---|---|---|---|---|");
    // The CPU batches fit a 2-core machine's patience; on a GPU every shape takes the realistic 256.
    for (arch, name, size, cpu_batch) in [
        (Arch::Resnet18, "ResNet-18", 64, 64),
        (Arch::Resnet18, "ResNet-18", 224, 16),
        (Arch::Resnet50, "ResNet-50", 64, 32),
        (Arch::Resnet50, "ResNet-50", 224, 8),
    ] {
        let batch = if on_cpu { cpu_batch } else { 256 };
        let config = PretrainConfig {
            arch,
            batch_size: batch,
            input_size: size,
            // Views equal to the inputs: the step itself is measured (the PyTorch side has no augmentations).
            augment: AugmentConfig::disabled(),
            epochs: 1000,
            warmup_epochs: 0.0,
            precision,
            ..PretrainConfig::default()
        };
        let mut trainer = Trainer::new(config, batch, device).expect("trainer");
        let images = Tensor::rand([batch as i64, 1, size, size], (Kind::Float, Device::Cpu));
        let ids: Vec<u64> = (0..batch as u64).collect();
        trainer.train_step(&images, &ids).expect("warm-up step");
        // The step reads its loss back to the host, so each step has finished on the device when it returns.
        let start = Instant::now();
        for _ in 0..steps {
            trainer.train_step(&images, &ids).expect("step");
        }
        let per_step = start.elapsed().as_secs_f64() / steps as f64;
        println!("| {name} | {size}x{size} | {batch} | {per_step:.3} | {:.1} |", batch as f64 / per_step);
    }
}

/// Both views of a batch with the `cxr` preset (crop, flip, rotation, jitter, gamma, blur), from the
/// cached 64x64 images to the model input size.
fn augmentation_throughput(repeats: u32) {
    println!("| augmentation (cxr preset, both views) | batch (images) | images/s |");
    println!("|---|---|---|");
    for (out, batch) in [(64, 256), (224, 64)] {
        let images = Tensor::rand([batch, 1, 64, 64], (Kind::Float, Device::Cpu));
        let ids: Vec<u64> = (0..batch as u64).collect();
        let config = AugmentConfig::cxr();
        let _ = two_views(&config, &images, &ids, 1, 0, out);
        let start = Instant::now();
        for epoch in 0..repeats as u64 {
            let _ = two_views(&config, &images, &ids, 1, epoch, out);
        }
        let rate = batch as f64 * repeats as f64 / start.elapsed().as_secs_f64();
        println!("| 64x64 -> {out}x{out} | {batch} | {rate:.0} |");
    }
}
