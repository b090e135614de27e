#!/usr/bin/env bash
# One SimCLR training step, ours (tch) against PyTorch (Python), same machine, same thread count, same run.
#   scripts/bench_step.sh [THREADS] [STEPS]   (the augmentations alone first, then the step)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
threads=${1:-2}
steps=${2:-2}
scripts/setup.sh --python >/dev/null
echo "## simclr-cluster (Rust, tch, libtorch $(.venv/bin/python -c 'import torch; print(torch.__version__)')), $threads threads"
cargo bench -q -p simclr-worker --bench simclr_step -- "$threads" "$steps"
echo
echo "## PyTorch $(.venv/bin/python -c 'import torch; print(torch.__version__)') + torchvision (Python), $threads threads"
.venv/bin/python scripts/bench_step_pytorch.py "$threads" "$steps"
