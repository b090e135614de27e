#!/usr/bin/env bash
# One SimCLR pretraining step with 2 worker processes on loopback: ours (gRPC ring, exact distributed
# NT-Xent, synchronised BatchNorm; release build) against PyTorch DDP (gloo, SyncBatchNorm), same models,
# inputs and global batches, same thread count per process, same machine, same run.
#   scripts/bench_distributed_step.sh [STEPS] [THREADS_PER_PROCESS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps=${1:-3}
threads=${2:-1}
scripts/setup.sh --python >/dev/null
cargo build -q --release -p simclr-worker --example bench_distributed_step --example bench_batchnorm
echo "## Synchronised BatchNorm's arithmetic: one process, $threads thread(s), forward and backward of the encoder"
target/release/examples/bench_batchnorm 11 "$threads"
echo
echo "## simclr-cluster, 2 processes x $threads thread(s)"
target/release/examples/bench_distributed_step "$steps" "$threads"
echo
echo "## PyTorch DDP, 2 processes x $threads thread(s)"
.venv/bin/python scripts/bench_distributed_step_ddp.py "$steps" "$threads"
