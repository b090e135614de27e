#!/usr/bin/env bash
# Lays out what the runtime image needs, from a build tree: OUT/bin holds the two binaries, OUT/lib every
# shared library they load from outside the system's directories (libtorch, its OpenMP, the CUDA
# runtime wheels), as `ldd` resolves them here, plus NCCL where the build has it (the worker opens it at
# run time for --collective nccl, so ldd does not list it). The image sets LD_LIBRARY_PATH=OUT/lib.
#
#   deploy/docker/gather.sh OUT target/release/simclr-coordinator target/release/simclr-worker
set -euo pipefail
out=${1:?usage: gather.sh OUT BINARY...}
shift
mkdir -p "$out/bin" "$out/lib"
for binary in "$@"; do
  [ -x "$binary" ] || { echo "gather: $binary is not an executable" >&2; exit 1; }
  cp "$binary" "$out/bin/"
  if ldd "$binary" | grep -q "not found"; then
    ldd "$binary" | grep "not found" >&2
    echo "gather: $binary has unresolved libraries (above)" >&2
    exit 1
  fi
  ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// {print $3}' | while read -r lib; do
    case "$lib" in
      /lib/*|/lib64/*|/usr/lib/*|/usr/lib64/*) ;;  # the base image's own
      *) cp -L "$lib" "$out/lib/" ;;
    esac
  done
done
# NCCL from the torch wheel's dependencies (the CUDA variant), under the name the worker opens.
for nccl in "$(dirname "$(readlink -f "$(ldd "$out/bin/simclr-worker" | awk '/libtorch_cpu/ {print $3}')")")"/../../nvidia/nccl/lib/libnccl.so.2; do
  if [ -f "$nccl" ]; then
    cp -L "$nccl" "$out/lib/libnccl.so.2"
    ln -sf libnccl.so.2 "$out/lib/libnccl.so"
  fi
done
echo "gather: $(ls "$out/bin" | tr '\n' ' ')and $(ls "$out/lib" | wc -l) libraries ($(du -sh "$out" | cut -f1)) in $out"
