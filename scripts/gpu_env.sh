# Sourced by scripts/gpu_check.sh and scripts/gpu_bench.sh: on a GPU host whose PyTorch wheel provides
# libtorch and NCCL, point the prebuilt binaries at them. Needs $out (the output folder), $py (a
# Python with torch) and $0's name for messages; sets $site and exports LD_LIBRARY_PATH and
# SIMCLR_CACHE_DIR (under $out).
mkdir -p "$out/lib"
site=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))') \
  || { echo "$(basename "$0"): $py cannot import torch" >&2; exit 1; }
# cudarc loads NCCL as libnccl.so; PyTorch's wheel ships libnccl.so.2 only.
if [ -f "$site/nvidia/nccl/lib/libnccl.so.2" ]; then
  ln -sf "$site/nvidia/nccl/lib/libnccl.so.2" "$out/lib/libnccl.so"
fi
export LD_LIBRARY_PATH="$out/lib:$site/torch/lib:$site/nvidia/nccl/lib:${LD_LIBRARY_PATH:-}"
export SIMCLR_CACHE_DIR="$out/cache"
