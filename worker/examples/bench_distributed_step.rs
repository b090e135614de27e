//! One SimCLR pretraining step with 2 worker processes on loopback (gRPC ring collectives, exact
//! distributed NT-Xent, synchronised BatchNorm), for `scripts/bench_distributed_step.sh`, which runs
//! PyTorch DDP (gloo, SyncBatchNorm, autograd all-gather) on the same model and batch beside it.
//!
//! Usage: bench_distributed_step [STEPS] [THREADS]. Prints one table row per case (rank 0).

#[path = "pair/mod.rs"]
mod pair;

use std::sync::Arc;
use std::time::Instant;

use simclr_worker::engine::augment::AugmentConfig;
use simclr_worker::engine::model::{with_torch_seed, Arch};
use simclr_worker::engine::train::{BnMode, OptimizerName, PretrainConfig, Trainer};
use tch::{Device, Kind, Tensor};

fn main() {
    let steps: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(3);
    let threads: i32 = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(1);
    tch::set_num_threads(threads);
    let pair = pair::Pair::start();
    let world = pair.tcp.world_size();
    if pair.rank == 0 {
        println!(
            "| model | input | global batch | BatchNorm | collectives | gradient all-reduce | ours: s/step (median) | images/s | in collectives | of which exposed (step waits) |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
    }
    let cases = [
        (Arch::Resnet18, "ResNet-18", 64i64, 64usize, BnMode::Sync),
        (Arch::Resnet18, "ResNet-18", 64, 64, BnMode::Local),
        (Arch::Resnet50, "ResNet-50", 64, 32, BnMode::Sync),
        (Arch::Resnet50, "ResNet-50", 64, 32, BnMode::Local),
    ];
    // 0: one all-reduce after the backward; 25: 25 MB buckets started during the backward, queued
    // with the step's other collectives (false) or on a channel of their own (true, as the worker).
    let buckets = [(0.0, false), (25.0, false), (25.0, true)];
    for (((arch, name, size, batch, bn), (backend, collective)), (bucket_mb, own_channel)) in cases
        .into_iter()
        .flat_map(|case| pair.backends().map(|b| (case, b)))
        .flat_map(|c| buckets.map(|m| (c.clone(), m)))
    {
        let config = PretrainConfig {
            arch,
            input_size: size,
            batch_size: batch,
            epochs: 1,
            optimizer: OptimizerName::Sgd,
            augment: AugmentConfig::disabled(),
            seed: 1,
            bn,
            bucket_mb,
            ..PretrainConfig::default()
        };
        let per = batch / world;
        let timed = Arc::new(simclr_worker::comm::Timed::new(Arc::clone(&collective)));
        let mut trainer =
            Trainer::distributed(config, per * (steps + 2), Device::Cpu, Arc::clone(&timed) as _).unwrap();
        let gradients = Arc::new(simclr_worker::comm::Timed::new(pair.gradients_of(backend)));
        if own_channel {
            trainer.use_gradient_collective(Arc::clone(&gradients) as _).unwrap();
        }
        let images =
            with_torch_seed(pair.rank as u64, || Tensor::rand([per as i64, 1, size, size], (Kind::Float, Device::Cpu)));
        let ids: Vec<u64> = (0..per as u64).map(|i| i + (pair.rank * per) as u64).collect();
        let mut times = Vec::new();
        let mut comm = Vec::new();
        let mut exposed = Vec::new();
        // The first step is not timed (warm-up; it also records the order of the gradients).
        for i in 0..steps + 1 {
            collective.barrier().unwrap();
            let before = timed.seconds() + gradients.seconds();
            let waited = trainer.exposed_communication_seconds().unwrap_or(0.0);
            let start = Instant::now();
            trainer.train_step(&images, &ids).unwrap();
            if i > 0 {
                times.push(start.elapsed().as_secs_f64());
                comm.push(timed.seconds() + gradients.seconds() - before);
                exposed.push(trainer.exposed_communication_seconds().unwrap_or(0.0) - waited);
            }
        }
        let median = |v: &mut Vec<f64>| {
            v.sort_by(|a, b| a.partial_cmp(b).unwrap());
            v[v.len() / 2]
        };
        let step = median(&mut times);
        if pair.rank == 0 {
            let reduce = match (bucket_mb > 0.0, own_channel) {
                (false, _) => "one, after the backward".to_string(),
                (true, false) => format!("{bucket_mb} MB buckets, overlapped, one queue"),
                (true, true) => format!("{bucket_mb} MB buckets, overlapped, own channel"),
            };
            println!(
                "| {name} | {size}x{size} | {batch} | {bn:?} | {backend} | {reduce} | {step:.3} | {:.1} | {:.3} s | {:.3} s ({:.0}% of the step) |",
                batch as f64 / step,
                median(&mut comm),
                median(&mut exposed),
                100.0 * median(&mut exposed) / step,
            );
        }
    }
    pair.finish();
}
