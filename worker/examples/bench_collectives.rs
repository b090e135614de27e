//! Collective benchmark between 2 processes on loopback: all-reduce of 11.2M and 23.5M float32 (the
//! gradients of ResNet-18 and ResNet-50) and all-gather of a 128 x 128 float32 embedding block, with the
//! gRPC ring backend. `scripts/bench_collectives.sh` runs it beside torch.distributed (gloo).
//!
//! Usage: bench_collectives [ITERATIONS]. The process re-executes itself as rank 1.

use std::sync::Arc;
use std::time::{Duration, Instant};

use simclr_proto::client::AttachToken;
use simclr_worker::collective::{Collective, GrpcCollective, Mailbox};
use simclr_worker::peer::{serve, Control};
use tch::{Kind, Tensor};

fn main() {
    let iterations: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(10);
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut child = None;
    let (rank, addrs, listener) = match std::env::var("BENCH_RANK") {
        Ok(r) => {
            let addrs: Vec<String> = std::env::var("BENCH_ADDRS").unwrap().split(',').map(str::to_string).collect();
            let rank: usize = r.parse().unwrap();
            let listener = runtime.block_on(tokio::net::TcpListener::bind(&addrs[rank])).unwrap();
            (rank, addrs, listener)
        }
        Err(_) => {
            let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
            let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addrs = vec![listener.local_addr().unwrap().to_string(), other.local_addr().unwrap().to_string()];
            drop(other);
            child = Some(
                std::process::Command::new(std::env::current_exe().unwrap())
                    .arg(iterations.to_string())
                    .env("BENCH_RANK", "1")
                    .env("BENCH_ADDRS", addrs.join(","))
                    .spawn()
                    .unwrap(),
            );
            (0, addrs, listener)
        }
    };
    let mailbox = Arc::new(Mailbox::default());
    let _server = runtime.spawn(serve(
        listener,
        Control::new(),
        Arc::clone(&mailbox),
        None,
        tokio_util::sync::CancellationToken::new(),
    ));
    let _context = runtime.enter();
    let c = GrpcCollective::new(
        rank,
        &addrs,
        mailbox,
        AttachToken::default(),
        Duration::from_secs(60),
        runtime.handle().clone(),
    )
    .unwrap();
    // The peer's server may still be starting: retry the first barrier.
    let started = Instant::now();
    while c.barrier().is_err() {
        assert!(started.elapsed() < Duration::from_secs(30), "peer never answered");
    }
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
        println!("| operation | ours (gRPC ring), median ms | min ms |");
        println!("|---|---|---|");
    }
    for (name, t, reduce) in &cases {
        let mut times = Vec::new();
        for i in 0..iterations + 2 {
            c.barrier().unwrap();
            let start = Instant::now();
            let out = if *reduce { c.all_reduce_sum(t).unwrap() } else { c.all_gather(t).unwrap() };
            let ms = start.elapsed().as_secs_f64() * 1e3;
            if i == 0 {
                let want = if *reduce { 2.0 } else { 1.0 };
                assert_eq!(out.double_value(&[0]), want, "wrong result");
            }
            if i >= 2 {
                times.push(ms);
            }
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        if rank == 0 {
            println!("| {name} | {:.1} | {:.1} |", times[times.len() / 2], times[0]);
        }
    }
    c.barrier().unwrap();
    if let Some(mut child) = child {
        let _ = child.wait();
    }
}
