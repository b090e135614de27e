#!/usr/bin/env bash
# Collectives between 2 processes on loopback: ours (TCP ring and gRPC ring, release build) against torch.distributed
# with gloo, same machine, same sizes, same run.
#   scripts/bench_collectives.sh [ITERATIONS]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
iterations=${1:-10}
scripts/setup.sh --python >/dev/null
cargo build -q --release -p simclr-worker --example bench_collectives
echo "## simclr-cluster, TCP ring and gRPC ring, 2 processes"
target/release/examples/bench_collectives "$iterations"
echo
echo "## torch.distributed gloo, 2 processes"
.venv/bin/python scripts/bench_collectives_gloo.py "$iterations"
