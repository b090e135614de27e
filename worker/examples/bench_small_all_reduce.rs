//! All-reduce on the TCP ring at growing sizes, two ways: the ring all-reduce (reduce-scatter and
//! all-gather, 2 (W - 1) steps) and an all-gather with a sum in rank order (W - 1 steps), W ranks on
//! loopback threads of this process. Where they cross sets `SMALL_ALL_REDUCE_BYTES`.
//!
//! Usage: bench_small_all_reduce [WORLD] [REPEATS]. Prints a table.

use std::time::{Duration, Instant};

use simclr_worker::comm::{set_small_all_reduce_bytes, Collective};
use simclr_worker::testing::loopback;
use tch::{Kind, Tensor};

fn main() {
    let world: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let repeats: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    tch::set_num_threads(1);
    let group = loopback::tcp_group(world, Duration::from_secs(60));
    println!("| ranks | bytes | ring all-reduce: ms | all-gather + ordered sum: ms | faster |");
    println!("|---|---|---|---|---|");
    for kib in [1usize, 4, 16, 64, 256, 1024, 4096] {
        let n = kib * 1024 / 4;
        let mut times = [0.0f64; 2];
        for (k, threshold) in [0usize, usize::MAX].into_iter().enumerate() {
            set_small_all_reduce_bytes(threshold);
            let per_rank = loopback::run(&group, |rank, c: &dyn Collective| {
                let t = Tensor::full([n as i64], rank as f64, (Kind::Float, tch::Device::Cpu));
                c.barrier().unwrap();
                let mut samples = Vec::with_capacity(repeats);
                for _ in 0..repeats {
                    let started = Instant::now();
                    let _ = c.all_reduce_sum(&t).unwrap();
                    samples.push(started.elapsed().as_secs_f64());
                }
                samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
                samples[samples.len() / 2]
            });
            times[k] = per_rank.into_iter().fold(0.0, f64::max) * 1e3;
        }
        let faster = if times[1] < times[0] { "gather + sum" } else { "ring" };
        println!("| {world} | {} KiB | {:.3} | {:.3} | {faster} |", kib, times[0], times[1]);
    }
    set_small_all_reduce_bytes(simclr_worker::comm::SMALL_ALL_REDUCE_BYTES);
}
