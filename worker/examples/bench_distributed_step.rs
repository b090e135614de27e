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
            "| model | input | global batch | BatchNorm | collectives | ours: s/step (median) | images/s | of which in collectives |"
        );
        println!("|---|---|---|---|---|---|---|---|");
    }
    let cases = [
        (Arch::Resnet18, "ResNet-18", 64i64, 64usize, BnMode::Sync),
        (Arch::Resnet18, "ResNet-18", 64, 64, BnMode::Local),
        (Arch::Resnet50, "ResNet-50", 64, 32, BnMode::Sync),
        (Arch::Resnet50, "ResNet-50", 64, 32, BnMode::Local),
    ];
    for ((arch, name, size, batch, bn), (backend, collective)) in
        cases.into_iter().flat_map(|case| pair.backends().map(|b| (case, b)))
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
            ..PretrainConfig::default()
        };
        let per = batch / world;
        let timed = Arc::new(simclr_worker::comm::Timed::new(Arc::clone(&collective)));
        let mut trainer =
            Trainer::distributed(config, per * (steps + 2), Device::Cpu, Arc::clone(&timed) as _).unwrap();
        let images =
            with_torch_seed(pair.rank as u64, || Tensor::rand([per as i64, 1, size, size], (Kind::Float, Device::Cpu)));
        let ids: Vec<u64> = (0..per as u64).map(|i| i + (pair.rank * per) as u64).collect();
        let mut times = Vec::new();
        let mut comm = Vec::new();
        for i in 0..steps + 1 {
            collective.barrier().unwrap();
            let before = timed.seconds();
            let start = Instant::now();
            trainer.train_step(&images, &ids).unwrap();
            if i > 0 {
                times.push(start.elapsed().as_secs_f64());
                comm.push(timed.seconds() - before);
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        comm.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let median = times[times.len() / 2];
        if pair.rank == 0 {
            println!(
                "| {name} | {size}x{size} | {batch} | {bn:?} | {backend} | {median:.3} | {:.1} | {:.3} s |",
                batch as f64 / median,
                comm[comm.len() / 2]
            );
        }
    }
    pair.finish();
}
