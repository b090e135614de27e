#!/usr/bin/env bash
# The CUDA and NCCL paths on a GPU host, as one short prepared script (the `device` tool's lent
# machines have PyTorch 2.11 but no Rust and no registry: carry target/release with prebuilt binaries,
# `cargo build --release --bins`). libtorch and NCCL come from the host's PyTorch. Everything it
# learns goes under $OUT (or ./gpu-check): nvidia-smi, torch's view of the GPU, and per run the log,
# the exit status and the run directory's results.
#   1. one worker on cuda:0 with NCCL as a world of one (--collective nccl): the CUDA training step,
#      the NCCL probe, rank 0's unique id through the coordinator, every collective through NCCL
#   2. two workers sharing cuda:0 with collective = auto, which picks the TCP ring for ranks that share
#      a GPU: GPU tensors through host memory
#   3. the same two with --collective nccl, which NCCL refuses for two ranks on one GPU (invalid usage,
#      seen on an H200): the job must stop at once, naming both ranks, without restarts (on a host with
#      2+ GPUs use --device cuda to spread them instead)
#   4. the training step benchmark on the GPU, ours (the `simclr_step` bench binary, found beside the
#      others; TF32 as PyTorch's default, then bf16 autocast with channels-last) against the same
#      step in PyTorch, same GPU, same run
#   5. synchronised BatchNorm's CUDA path (libtorch's fused SyncBatchNorm kernels) in one process
#      against libtorch's BatchNorm: time per pass and the largest gradient difference (the
#      `bench_batchnorm` example binary: `cargo build --release -p simclr-worker --example bench_batchnorm`)
#   6. run 1 again on the CPU: the first step's loss must agree with the GPU's (the weights are drawn
#      on the CPU under the seed and the views' parameters come from the seed too; only the
#      arithmetic differs, TF32 convolutions included)
#   scripts/gpu_check.sh [SECONDS_PER_RUN]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
limit=${1:-150}
out=${OUT:-gpu-check}
bin=${SIMCLR_BIN:-target/release}
py=${PYTHON:-python3}
. scripts/gpu_env.sh
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
"$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(), "nccl", torch.cuda.nccl.version())' \
  > "$out/torch.txt" 2>&1
cat "$out/torch.txt"
ldd "$bin/simclr-worker" > "$out/ldd-worker.txt" 2>&1

check() { # name, then the coordinator's arguments
  local name=$1; shift
  local started=$SECONDS
  timeout -k 10 "$limit" "$bin/simclr-coordinator" dev --config configs/gpu_check.toml \
    --run-dir "$out/$name" "$@" > "$out/$name.log" 2>&1
  local status=$?
  echo "$name: exit $status after $((SECONDS - started)) s" | tee -a "$out/summary.txt"
  grep -E "ERROR|NCCL|panicked" "$out/$name.log" | head -5 | cut -c1-300
  if [ -f "$out/$name/pretrain.json" ]; then
    "$py" -c 'import json, sys; d = json.load(open(sys.argv[1]))["cluster"]; print("  ", {k: round(v, 3) for k, v in d.items() if k in ("steps", "first_loss", "final_loss", "images_per_s", "communication_seconds", "seconds")})' \
      "$out/$name/pretrain.json" | tee -a "$out/summary.txt"
  fi
}
check nccl-world-1 --workers 1 --device cuda:0 --collective nccl
check auto-2-on-gpu0 --workers 2 --device cuda:0
check nccl-2-on-gpu0 --workers 2 --device cuda:0 --collective nccl --max-steps 2
if [ -x "$bin/simclr_step" ]; then
  { echo "## simclr-cluster (tch), cuda:0, tf32"; timeout -k 10 "$limit" "$bin/simclr_step" 16 10 cuda:0 tf32
    echo "## simclr-cluster (tch), cuda:0, bf16 autocast, channels-last"
    timeout -k 10 "$limit" "$bin/simclr_step" 16 10 cuda:0 bf16
    echo "## PyTorch + torchvision, cuda:0"; timeout -k 10 "$limit" "$py" scripts/bench_step_pytorch.py 16 10 cuda:0
  } 2>&1 | tee "$out/bench_step.txt"
fi
bench_bn=$bin/bench_batchnorm
[ -x "$bench_bn" ] || bench_bn=$bin/examples/bench_batchnorm
if [ -x "$bench_bn" ]; then
  timeout -k 10 "$limit" "$bench_bn" 5 1 cuda:0 2>&1 | tee "$out/bench_batchnorm.txt"
fi
check cpu-world-1 --workers 1 --device cpu --max-steps 2
"$py" - "$out" <<'PY' | tee -a "$out/summary.txt"
import json, sys
loss = {}
for name in ("nccl-world-1", "cpu-world-1"):
    try:
        loss[name] = json.load(open(f"{sys.argv[1]}/{name}/pretrain.json"))["cluster"]["first_loss"]
    except (OSError, KeyError, ValueError) as e:
        print(f"first-step loss of {name}: missing ({e})")
if len(loss) == 2:
    gpu, cpu = loss["nccl-world-1"], loss["cpu-world-1"]
    print(f"first-step loss: cuda {gpu:.6f}, cpu {cpu:.6f}, relative difference {abs(gpu - cpu) / abs(cpu):.2e}")
PY
