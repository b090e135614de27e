"""The peer of worker/examples/bench_distributed_step.rs: one SimCLR step with 2 processes in PyTorch,
as a PyTorch user would write it on CPUs: DistributedDataParallel (gloo), per-process BatchNorm
(torch.nn.SyncBatchNorm refuses CPU modules: "SyncBatchNorm layers only work with GPU modules"), the projections
gathered with torch.distributed.nn.all_gather (autograd-aware), NT-Xent for the local anchors, SGD with
momentum. Same model (torchvision ResNet + 2-layer head), input and global batch as ours.

Usage: python scripts/bench_distributed_step_ddp.py [STEPS] [THREADS]
"""
import sys
import time

import torch
import torch.distributed as dist
import torch.distributed.nn
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from bench_pair import run_pair

CASES = [("ResNet-18", torchvision.models.resnet18, 64, 64), ("ResNet-50", torchvision.models.resnet50, 64, 32)]


def worker(rank, steps, threads):
    torch.set_num_threads(threads)
    rows = []
    for name, ctor, size, batch in CASES:
        torch.manual_seed(1)
        encoder = ctor()
        features = encoder.fc.in_features
        encoder.fc = nn.Identity()
        model = nn.Sequential(encoder, nn.Linear(features, features), nn.ReLU(), nn.Linear(features, 128))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-6)
        per = batch // 2
        torch.manual_seed(rank)
        images = torch.rand(per, 1, size, size)
        times = []
        for i in range(steps + 1):
            dist.barrier()
            start = time.perf_counter()
            views = torch.cat([images, images]).repeat(1, 3, 1, 1)
            z = F.normalize(ddp(views), dim=1)
            keys = torch.cat(torch.distributed.nn.all_gather(z))
            n = 2 * per
            sim = z @ keys.T / 0.5
            own = torch.arange(n) + rank * n
            sim = sim.masked_fill(F.one_hot(own, keys.shape[0]).bool(), float("-inf"))
            positive = rank * n + (torch.arange(n) + per) % n
            # DDP averages gradients over the ranks: scale so the update is that of the global loss.
            loss = F.cross_entropy(sim, positive, reduction="sum") / (2 * batch) * 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i > 0:
                times.append(time.perf_counter() - start)
        times.sort()
        rows.append((name, size, batch, times[len(times) // 2]))
    return rows


def main():
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    rows = run_pair(worker, steps, threads)
    print(f"| model | input | global batch | PyTorch {torch.__version__} DDP (gloo, local BN): s/step (median) | images/s |")
    print("|---|---|---|---|---|")
    for name, size, batch, median in rows:
        print(f"| {name} | {size}x{size} | {batch} | {median:.3f} | {batch / median:.1f} |")


if __name__ == "__main__":
    main()
