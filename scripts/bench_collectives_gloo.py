"""The peer of worker/examples/bench_collectives.rs: the same collectives between 2 processes on
loopback with torch.distributed's gloo backend (what a PyTorch user would run on CPUs).

Usage: python scripts/bench_collectives_gloo.py [ITERATIONS]
"""
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = [
    ("all-reduce 11.2M float32 (ResNet-18 gradients)", 11_200_000, True),
    ("all-reduce 23.5M float32 (ResNet-50 gradients)", 23_500_000, True),
    ("all-gather 128x128 float32 (64 KiB per rank)", (128, 128), False),
]


def worker(rank, port, iterations, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    results = []
    for name, shape, reduce in CASES:
        t = torch.ones(shape)
        out = [torch.empty(shape) for _ in range(2)]
        times = []
        for i in range(iterations + 2):
            x = t.clone()
            dist.barrier()
            start = time.perf_counter()
            if reduce:
                dist.all_reduce(x)
            else:
                dist.all_gather(out, x)
            ms = (time.perf_counter() - start) * 1e3
            if i >= 2:
                times.append(ms)
        times.sort()
        results.append((name, times[len(times) // 2], times[0]))
    if rank == 0:
        queue.put(results)
    dist.destroy_process_group()


def main():
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, port, iterations, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = queue.get()
    for p in procs:
        p.join()
    print(f"| operation | torch {torch.__version__} gloo, median ms | min ms |")
    print("|---|---|---|")
    for name, median, best in results:
        print(f"| {name} | {median:.1f} | {best:.1f} |")


if __name__ == "__main__":
    main()
