"""The peer of worker/examples/bench_collectives.rs: the same collectives between 2 processes on
loopback with torch.distributed's gloo backend (what a PyTorch user would run on CPUs).

Usage: python scripts/bench_collectives_gloo.py [ITERATIONS]
"""
import sys
import time

import torch
import torch.distributed as dist

from bench_pair import run_pair

CASES = [
    ("all-reduce 11.2M float32 (ResNet-18 gradients)", 11_200_000, True),
    ("all-reduce 23.5M float32 (ResNet-50 gradients)", 23_500_000, True),
    ("all-gather 128x128 float32 (64 KiB per rank)", (128, 128), False),
]


def worker(rank, iterations):
    torch.set_num_threads(1)
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
    return results


def main():
    iterations = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    results = run_pair(worker, iterations)
    print(f"| operation | torch {torch.__version__} gloo, median ms | min ms |")
    print("|---|---|---|")
    for name, median, best in results:
        print(f"| {name} | {median:.1f} | {best:.1f} |")


if __name__ == "__main__":
    main()
