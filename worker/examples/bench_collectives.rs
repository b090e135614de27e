//! Collective benchmark between 2 processes on loopback: all-reduce of 11.2M and 23.5M float32 (the
//! gradients of ResNet-18 and ResNet-50) and all-gather of a 128 x 128 float32 embedding block, with the
//! TCP-ring and gRPC-ring backends. `scripts/bench_collectives.sh` runs it beside torch.distributed (gloo).
//!
//! Usage: bench_collectives [ITERATIONS]. The process re-executes itself as rank 1.

use std::time::Instant;

use tch::{Kind, Tensor};

#[path = "pair/mod.rs"]
mod pair;

fn main() {
    let iterations: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let pair = pair::Pair::start();
    let rank = pair.rank;
    let cases: [(&str, Tensor, bool); 3] = [
        (
            "all-reduce 11.2M float32 (ResNet-18 gradients)",
            Tensor::ones([11_200_000], (Kind::Float, tch::Device::Cpu)),
            true,
        ),
        (
            "all-reduce 23.5M float32 (ResNet-50 gradients)",
            Tensor::ones([23_500_000], (Kind::Float, tch::Device::Cpu)),
            true,
        ),
        (
            "all-gather 128x128 float32 (64 KiB per rank)",
            Tensor::ones([128, 128], (Kind::Float, tch::Device::Cpu)),
            false,
        ),
    ];
    if rank == 0 {
        println!("| operation | ours, TCP ring: median ms | min ms | ours, gRPC ring: median ms | min ms |");
        println!("|---|---|---|---|---|");
    }
    for (name, t, reduce) in &cases {
        let mut row = format!("| {name} |");
        for (_, c) in pair.backends() {
            let mut times = Vec::new();
            for i in 0..iterations + 2 {
                c.barrier().unwrap();
                let start = Instant::now();
                // In place, as torch.distributed's all_reduce is.
                let mut buf = t.shallow_clone();
                let out = if *reduce {
                    c.all_reduce_sum_in_place(&mut buf).unwrap();
                    buf
                } else {
                    c.all_gather(t).unwrap()
                };
                let ms = start.elapsed().as_secs_f64() * 1e3;
                if i == 0 {
                    let want = if *reduce { 2.0 } else { 1.0 };
                    assert_eq!(out.flatten(0, -1).double_value(&[0]), want, "wrong result");
                }
                if *reduce {
                    // Back to ones for the next iteration (outside the timing).
                    let _ = t.shallow_clone().fill_(1.0);
                }
                if i >= 2 {
                    times.push(ms);
                }
            }
            times.sort_by(|a, b| a.partial_cmp(b).unwrap());
            row += &format!(" {:.1} | {:.1} |", times[times.len() / 2], times[0]);
        }
        if rank == 0 {
            println!("{row}");
        }
    }
    pair.finish();
}
