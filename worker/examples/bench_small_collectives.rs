//! The collectives synchronised BatchNorm issues, on the TCP backend at growing sizes, each algorithm
//! forced, W ranks on loopback threads of this process:
//! - all-reduce: the ring all-reduce (reduce-scatter and all-gather, 2 (W - 1) steps), the ring's
//!   all-gather with a sum in rank order (W - 1 steps), Bruck's all-gather with the same sum
//!   (ceil(log2 W) steps);
//! - all-gather: the ring, Bruck's; and for groups of 4 consecutive ranks (a BatchNorm group of
//!   `pretrain.bn_group_size = 4`) the ring over the whole world keeping the group's rows, and Bruck's
//!   within the group.
//!
//! Where they cross sets `SMALL_ALL_REDUCE_BYTES` and `SMALL_ALL_GATHER_BYTES`.
//!
//! Usage: bench_small_collectives [WORLD] [REPEATS]. Prints two tables (median ms per call, the
//! slowest rank's).

use std::time::{Duration, Instant};

use simclr_worker::comm::{set_latency_algorithms, set_small_all_gather_bytes, set_small_all_reduce_bytes, Collective};
use simclr_worker::testing::loopback;
use tch::{Kind, Tensor};

/// The median over `repeats` calls of `call`, the slowest rank's, in ms.
fn median_ms(group: &loopback::Group, repeats: usize, call: impl Fn(&dyn Collective, usize) + Sync) -> f64 {
    let per_rank = loopback::run(group, |rank, c: &dyn Collective| {
        c.barrier().unwrap();
        let mut samples = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            let started = Instant::now();
            call(c, rank);
            samples.push(started.elapsed().as_secs_f64());
        }
        samples.sort_by(|a, b| a.partial_cmp(b).unwrap());
        samples[samples.len() / 2]
    });
    per_rank.into_iter().fold(0.0, f64::max) * 1e3
}

fn fastest(names: &[&str], times: &[f64]) -> String {
    let best = (0..times.len()).min_by(|&a, &b| times[a].partial_cmp(&times[b]).unwrap()).unwrap();
    names[best].to_string()
}

fn main() {
    let world: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(4);
    let repeats: usize = std::env::args().nth(2).and_then(|s| s.parse().ok()).unwrap_or(50);
    tch::set_num_threads(1);
    let group = loopback::tcp_group(world, Duration::from_secs(60));
    let sizes = [256usize, 1024, 4096, 16384, 65536, 262144];
    let label = |bytes: usize| if bytes < 1024 { format!("{bytes} B") } else { format!("{} KiB", bytes / 1024) };

    println!("All-reduce (bytes per rank):\n");
    println!(
        "| ranks | bytes | ring all-reduce: ms | ring all-gather + sum: ms | Bruck all-gather + sum: ms | fastest |"
    );
    println!("|---|---|---|---|---|---|");
    let reduce_names = ["ring all-reduce", "ring gather + sum", "Bruck gather + sum"];
    for bytes in sizes {
        let n = bytes / 4;
        let mut times = Vec::new();
        for (reduce_threshold, gather_threshold) in [(0usize, 0usize), (usize::MAX, 0), (usize::MAX, usize::MAX)] {
            set_small_all_reduce_bytes(reduce_threshold);
            set_small_all_gather_bytes(gather_threshold);
            times.push(median_ms(&group, repeats, |c, rank| {
                let t = Tensor::full([n as i64], rank as f64, (Kind::Float, tch::Device::Cpu));
                let _ = c.all_reduce_sum(&t).unwrap();
            }));
        }
        println!(
            "| {world} | {} | {:.3} | {:.3} | {:.3} | {} |",
            label(bytes),
            times[0],
            times[1],
            times[2],
            fastest(&reduce_names, &times)
        );
    }

    println!("\nAll-gather (bytes per rank):\n");
    println!(
        "| ranks | bytes | ring: ms | Bruck: ms | fastest | groups of 4, ring over the world: ms | groups of 4, Bruck within: ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let gather_names = ["ring", "Bruck"];
    for bytes in sizes {
        let n = bytes / 4;
        let mut times = Vec::new();
        for gather_threshold in [0usize, usize::MAX] {
            set_small_all_gather_bytes(gather_threshold);
            times.push(median_ms(&group, repeats, |c, rank| {
                let _ = c.all_gather(&Tensor::full([n as i64], rank as f64, (Kind::Float, tch::Device::Cpu))).unwrap();
            }));
        }
        let grouped = |latency: bool| {
            if !world.is_multiple_of(4) {
                return "-".to_string();
            }
            set_latency_algorithms(latency);
            let ms = median_ms(&group, repeats, |c, rank| {
                let t = Tensor::full([n as i64], rank as f64, (Kind::Float, tch::Device::Cpu));
                let _ = c.group_all_gather(&t, rank / 4 * 4, 4).unwrap();
            });
            set_latency_algorithms(true);
            format!("{ms:.3}")
        };
        let (before, after) = (grouped(false), grouped(true));
        println!(
            "| {world} | {} | {:.3} | {:.3} | {} | {before} | {after} |",
            label(bytes),
            times[0],
            times[1],
            fastest(&gather_names, &times)
        );
    }
    set_small_all_reduce_bytes(simclr_worker::comm::SMALL_ALL_REDUCE_BYTES);
    set_small_all_gather_bytes(simclr_worker::comm::SMALL_ALL_GATHER_BYTES);
}
