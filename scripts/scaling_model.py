#!/usr/bin/env python3
"""How a pretraining step's time grows with the number of workers: a model, calibrated on this
machine, then evaluated for GPU clusters (docs/scaling.md explains it).

    scripts/scaling_model.py      # measures with scripts/bench_scale.sh (about 4 minutes)
    scripts/scaling_model.py SYNC.md LOCAL.md RING_SYNC.md RING_LOCAL.md
                                  # or reads four saved outputs of it: synchronised and per-rank
                                  # BatchNorm, each as the workers run by default and with
                                  # SIMCLR_COLLECTIVE_ALGORITHM=ring

Step time(N) = compute + gradient all-reduce (exposed) + latency-bound collectives + gather.
Latency-bound collectives: each collective of the step costs `steps x latency`: ceil(log2 N) steps for
a small all-gather (Bruck's algorithm) or a small all-reduce (up to 16 KiB: Bruck's all-gather and a
sum), N - 1 for a ring reduce-scatter and 2 (N - 1) for a large all-reduce; synchronised BatchNorm
adds one all-gather (forward) and one small all-reduce (backward) per BatchNorm layer, within the
BatchNorm group when `pretrain.bn_group_size` is set; with SIMCLR_COLLECTIVE_ALGORITHM=ring every
collective takes the ring's steps. On a machine where the workers share a few cores a collective also
waits until every process has been scheduled, a cost per collective that grows with N whatever the
algorithm; the calibration fits both terms, from runs with both algorithms (with the ring alone the two
are proportional and cannot be told apart).
"""

import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The tiny encoder of scripts/bench_scale.sh: 12 BatchNorm layers (stem, 4 basic blocks of 2, 3
# downsample branches).
TINY_BN_LAYERS = 12


def log_steps(n):
    return math.ceil(math.log2(n)) if n > 1 else 0


def step_hops(n, bn_layers, ring=False, group=0):
    """Point-to-point steps per training step: the projections' all-gather and the loss's all-reduce
    (small: Bruck, ceil(log2 N) steps; the ring: N - 1), the key gradients' reduce-scatter (the ring,
    N - 1), and per BatchNorm layer an all-gather and a small all-reduce among the BatchNorm group's G
    ranks (Bruck within the group, ceil(log2 G); the ring: over the whole world, N - 1 each)."""
    if n < 2:
        return 0
    g = min(group or n, n)
    if ring:
        return 3 * (n - 1) + bn_layers * 2 * (n - 1)
    return 2 * log_steps(n) + (n - 1) + bn_layers * 2 * log_steps(g)


def read_table(text):
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[0].isdigit():
            n = int(cells[0])
            rows[n] = {
                "step": float(cells[3]),
                "main": float(cells[4]),
                "gradients": float(cells[5]),
                "exposed": float(cells[6]),
            }
    return rows


def measure():
    """Four runs of bench_scale.sh: synchronised and per-rank BatchNorm, each with the default
    algorithms and with the ring for every collective."""
    out = []
    for algorithm in ["auto", "ring"]:
        for extra in ["", 'bn = "local"']:
            env = dict(os.environ, SCALE_PRETRAIN=extra, SIMCLR_COLLECTIVE_ALGORITHM=algorithm)
            run = subprocess.run([os.path.join(ROOT, "scripts", "bench_scale.sh")], env=env, capture_output=True,
                                 text=True, check=True)
            out.append(run.stdout)
    return out


def collectives(bn_layers):
    """Collectives per step on the main channel: the projections' gather, the key gradients'
    reduce-scatter, the loss, and two per BatchNorm layer."""
    return 3 + 2 * bn_layers


def calibrate(datasets):
    """Least squares over every (BatchNorm mode, algorithm) table, N >= 2, of the main channel's seconds
    per step = latency x point-to-point steps + wait x collectives x N. The second term is what a
    collective costs when N processes share a few cores: none can finish before every process has been
    scheduled to add its part, whatever the algorithm. Returns (latency, wait)."""
    points = [(step_hops(n, layers, ring), collectives(layers) * n, r["main"])
              for _, rows, layers, ring in datasets for n, r in rows.items() if n >= 2]
    saa = sum(a * a for a, _, _ in points)
    sbb = sum(b * b for _, b, _ in points)
    sab = sum(a * b for a, b, _ in points)
    sat = sum(a * t for a, _, t in points)
    sbt = sum(b * t for _, b, t in points)
    det = saa * sbb - sab * sab
    latency, wait = (sat * sbb - sab * sbt) / det, (saa * sbt - sab * sat) / det
    if latency < 0:
        return 0.0, sbt / sbb
    if wait < 0:
        return sat / saa, 0.0
    return latency, wait


def print_calibration(datasets, fit):
    latency, wait = fit
    print(f"## Calibration on this machine: {latency * 1e3:.3f} ms per point-to-point step and {wait * 1e3:.3f} ms "
          "per collective and process (least squares, N >= 2)")
    print()
    print("| BatchNorm, algorithms | workers | point-to-point steps per step | main channel: measured s/step | model "
          "| error | step: measured s | model (compute at N = 1 + channels) | error |")
    print("|---|---|---|---|---|---|---|---|---|")
    errors = []
    for name, rows, layers, ring in datasets:
        compute = rows[1]["step"] if 1 in rows else 0.0
        for n in sorted(rows):
            r = rows[n]
            hops = step_hops(n, layers, ring)
            main = latency * hops + (wait * collectives(layers) * n if n >= 2 else 0.0)
            step = compute + main + r["gradients"]
            e_main = (main - r["main"]) / r["main"] if r["main"] > 0 else 0.0
            e_step = (step - r["step"]) / r["step"]
            if n >= 2:
                errors.append(abs(e_step))
            print(f"| {name} | {n} | {hops} | {r['main']:.3f} | {main:.3f} | {100 * e_main:+.0f}% | {r['step']:.3f} "
                  f"| {step:.3f} | {100 * e_step:+.0f}% |")
    print()
    print(f"Step time: mean absolute error {100 * sum(errors) / len(errors):.0f}%, largest "
          f"{100 * max(errors):.0f}% (N >= 2).")
    print()


# GPU clusters: ResNet-50 at 224 x 224, 256 images per GPU per step (the global batch grows with N).
RESNET50_BN_LAYERS = 53
# Encoder (torchvision ResNet-50 without fc: 23.51M) and the default head (2048 -> 2048 -> 128).
PARAMS = 23_508_032 + (2048 * 2048 + 2048) + (2048 * 128 + 128)
GRADIENT_BYTES = 4 * PARAMS
PER_GPU = 256
# Per-GPU training throughput, images/s: measured (H200, fp32 with cuDNN's TF32, BENCHMARKS.md) and
# what PyTorch AMP gets on an H100 (Lambda's benchmark; what bf16 is for: not measured for us).
THROUGHPUT = {"fp32/TF32, measured on an H200": 1026.0, "bf16, if at PyTorch AMP's H100 figure": 2792.0}
# nccl-tests bus bandwidth: ~370-480 GB/s inside an 8-GPU NVLink node, ~330 GB/s across nodes with
# 3.2 Tb/s InfiniBand.
BUS_BW_NODE = 400e9
BUS_BW_NODES = 330e9
# Small-message all-reduce latency: ~34 us for 8 GPUs in a DGX-A100 with the ring algorithm (nccl-tests
# issue #123), ~60 us across 2 H100 nodes (NCCL issue #1453); across more nodes NCCL's tree grows with
# log2 of the nodes. The latency-bound collectives of a step are counted in all-reduce equivalents.
def small_allreduce_latency(n):
    if n <= 8:
        return 34e-6
    return 60e-6 + 10e-6 * math.log2(n / 8)


def gpu_step(n, throughput, groups):
    compute = PER_GPU / throughput
    bw = BUS_BW_NODE if n <= 8 else BUS_BW_NODES
    allreduce = GRADIENT_BYTES * 2 * (n - 1) / n / bw
    # Counted whole: with NCCL on the default stream the backward does not hide it.
    exposed = allreduce
    bn_world = min(n, 8) if groups else n
    syncbn = 2 * RESNET50_BN_LAYERS * small_allreduce_latency(bn_world) if bn_world > 1 else 0.0
    # Projections (2 x 256 x 128 float32 per GPU) all-gathered, their gradients reduce-scattered.
    z_bytes = 2 * PER_GPU * 128 * 4
    gather = 2 * ((n - 1) * z_bytes / bw + small_allreduce_latency(n))
    total = compute + exposed + syncbn + gather
    return compute, exposed, syncbn, gather, total


def print_gpu():
    print("## Projection for GPU clusters: ResNet-50 at 224 x 224, 256 images per GPU per step")
    print()
    print(f"Gradients {GRADIENT_BYTES / 1e6:.0f} MB; bus bandwidth {BUS_BW_NODE / 1e9:.0f} GB/s in a node, "
          f"{BUS_BW_NODES / 1e9:.0f} GB/s across nodes; small all-reduce latency 34 us (8 GPUs) to "
          f"{small_allreduce_latency(256) * 1e6:.0f} us (256 GPUs).")
    print()
    print("| per-GPU compute | GPUs | BatchNorm | compute s | gradient all-reduce s (not hidden) "
          "| BatchNorm collectives s | projections' gather s | step s | scaling efficiency |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, throughput in THROUGHPUT.items():
        for n in [8, 64, 256]:
            for groups in [False, True]:
                c, e, s, g, t = gpu_step(n, throughput, groups)
                print(f"| {label} | {n} | {'groups of 8' if groups else 'global'} | {c:.3f} | {e:.4f} | {s:.4f} "
                      f"| {g:.4f} | {t:.3f} | {100 * c / t:.0f}% |")
    print()
    print("The gradient all-reduce is counted whole (not hidden behind the backward, as with NCCL on the "
          "default stream today); hidden, it would save at most the column's value.")


def main():
    args = sys.argv[1:]
    if len(args) == 4:
        texts = [open(a).read() for a in args]
    elif not args:
        texts = measure()
    else:
        sys.exit("usage: scaling_model.py [SYNC.md LOCAL.md RING_SYNC.md RING_LOCAL.md]")
    tables = [read_table(t) for t in texts]
    if not all(tables):
        sys.exit("scaling_model: no measurements in an input (expected scripts/bench_scale.sh tables)")
    datasets = [
        ("sync, Bruck", tables[0], TINY_BN_LAYERS, False),
        ("local, Bruck", tables[1], 0, False),
        ("sync, ring", tables[2], TINY_BN_LAYERS, True),
        ("local, ring", tables[3], 0, True),
    ]
    fit = calibrate(datasets)
    print_calibration(datasets, fit)
    print_gpu()


if __name__ == "__main__":
    main()
