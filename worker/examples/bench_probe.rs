//! One probe task of the sweep, timed: the demo's shapes (1013 training and 175 test rows of 512-d
//! features, one label), the default optimiser (SGD, momentum 0.9, lr 0.01, batch 64), 25 epochs with
//! both splits evaluated after every epoch, as `probe::train_probe` does in the sweep.
//! `scripts/bench_probe.sh` runs it beside the same loop in PyTorch.
//!
//! Usage: bench_probe [THREADS=1] [REPEATS=5]

use std::time::Instant;

use simclr_worker::engine::model::with_torch_seed;
use simclr_worker::probe::{train_probe, ProbeConfig};
use tch::{Device, Kind, Tensor};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let threads: i32 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(1);
    let repeats: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    tch::set_num_threads(threads);
    let data = |n: i64, seed: u64| {
        with_torch_seed(seed, || {
            let y = Tensor::rand([n, 1], (Kind::Float, Device::Cpu)).ge(0.5).to_kind(Kind::Float);
            let x = Tensor::randn([n, 512], (Kind::Float, Device::Cpu)) + &y * 0.3;
            (x, y)
        })
    };
    let (train_x, train_y) = data(1013, 1);
    let (test_x, test_y) = data(175, 2);
    println!("| probe (25 epochs) | bootstrap | ms per task (median of {repeats}) |");
    println!("|---|---|---|");
    for (name, hidden, dropout) in [("linear", 0, 0.0), ("100 hidden", 100, 0.0), ("500 hidden, dropout 0.2", 500, 0.2)]
    {
        for bootstrap in [0, 1000] {
            let config = ProbeConfig { hidden, dropout, epochs: 25, bootstrap, ..ProbeConfig::default() };
            let mut times: Vec<f64> = (0..repeats)
                .map(|_| {
                    let t = Instant::now();
                    train_probe(&train_x, &train_y, &test_x, &test_y, &config).expect("probe");
                    t.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            times.sort_by(f64::total_cmp);
            println!("| {name} | {bootstrap} | {:.1} |", times[repeats / 2]);
        }
    }
}
