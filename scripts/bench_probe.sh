#!/usr/bin/env bash
# One probe task of the sweep, ours (Rust, tch) against the same loop in PyTorch, same machine, same
# thread count, same run.   scripts/bench_probe.sh [THREADS=1] [REPEATS=5]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
threads=${1:-1}
repeats=${2:-5}
scripts/setup.sh --python >/dev/null
echo "## simclr-cluster (Rust, tch), $threads thread(s)"
cargo run -q -p simclr-worker --example bench_probe -- "$threads" "$repeats"
echo
echo "## PyTorch $(.venv/bin/python -c 'import torch; print(torch.__version__)') (Python), $threads thread(s)"
.venv/bin/python scripts/bench_probe_pytorch.py "$threads" "$repeats"
