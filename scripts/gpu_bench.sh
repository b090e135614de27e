#!/usr/bin/env bash
# GPU speed, side by side in one run on a lent GPU host (the `device` tool's machines have PyTorch 2.11
# but no Rust: carry target/release with `cargo build --release --bins`, the `simclr_step` bench binary
# from `cargo bench --no-run -p simclr-worker --bench simclr_step` copied beside them).
#   1. one SimCLR step, ours (`simclr_step`) against PyTorch's (scripts/bench_step_pytorch.py: the same
#      model, views, batch 256, loss and LARS; bf16 is torch.autocast with channels_last, the AMP
#      recipe, torch.compile off), ResNet-18/50 at 64 and 224 px, in fp32, tf32 and bf16
#   2. our whole job loop (configs/gpu_bench.toml: ResNet-50 at 224 px, batch 256, synthetic data,
#      bf16) on one GPU: images/s over the pretraining phase from pretrain.json, against the step alone
#   3. the share of the bf16 ceiling: 989 dense TFLOPS (H100/H200 SXM) over about 24.5 GFLOP per
#      ResNet-50 training image at 224 px (three times the forward's 8.2) is about 40,000 images/s
# Everything goes under $OUT (or ./gpu-bench); the tables also go to stdout. Under 6 minutes on an H200.
#   scripts/gpu_bench.sh [STEPS]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
steps=${1:-10}
out=${OUT:-gpu-bench}
bin=${SIMCLR_BIN:-target/release}
py=${PYTHON:-python3}
. scripts/gpu_env.sh
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for precision in fp32 tf32 bf16; do
  echo "## simclr-cluster, cuda:0, $precision" | tee -a "$out/step.md"
  timeout -k 10 120 "$bin/simclr_step" 16 "$steps" cuda:0 "$precision" 2>&1 | tee -a "$out/step.md"
  echo "## PyTorch $("$py" -c 'import torch; print(torch.__version__)'), cuda:0, $precision" | tee -a "$out/step.md"
  timeout -k 10 120 "$py" scripts/bench_step_pytorch.py 16 "$steps" cuda:0 "$precision" 2>&1 | tee -a "$out/step.md"
done
started=$SECONDS
timeout -k 10 240 "$bin/simclr-coordinator" dev --config configs/gpu_bench.toml --run-dir "$out/loop" \
  --workers 1 --device cuda:0 --precision bf16 > "$out/loop.log" 2>&1
echo "whole loop: exit $? after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
"$py" - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, re, sys
out = sys.argv[1]
step = None
section = None
for line in open(f"{out}/step.md"):
    if line.startswith("## "):
        section = line
    elif section and "simclr-cluster" in section and "bf16" in section and line.startswith("| ResNet-50 | 224x224"):
        step = float(line.split("|")[5])
try:
    loop = json.load(open(f"{out}/loop/pretrain.json"))["cluster"]["images_per_s"]
except (OSError, KeyError, ValueError) as e:
    loop = None
    print(f"whole loop: no images/s ({e})")
if step:
    print(f"ResNet-50 at 224, bf16, step alone: {step:.0f} images/s, {100 * step / 40000:.1f}% of the ~40,000 images/s bf16 ceiling")
if step and loop:
    print(f"whole loop: {loop:.0f} images/s, {100 * loop / step:.0f}% of the step alone")
PY
