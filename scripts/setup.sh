#!/usr/bin/env bash
# Set-up behind the README's two commands: a project-local virtual environment holding libtorch 2.11.0
# (PyPI's torch wheel), linked as .venv/libtorch, which .cargo/config.toml points LIBTORCH at.
#
#   scripts/setup.sh          CPU hosts: torch with --no-deps plus the two CUDA runtime libraries that
#                             libtorch_cpu links even on CPU (cudart, cupti). About 1.3 GB.
#   scripts/setup.sh --cuda   GPU hosts: torch with its full dependency set (cuBLAS, cuDNN, NCCL, ...).
#
# A second run with the same options is a no-op. A user whose LIBTORCH already points at libtorch 2.11
# skips the download entirely (cargo then uses that LIBTORCH instead of .venv/libtorch).
set -euo pipefail

TORCH_VERSION=2.11.0
CPU_PACKAGES=("torch==${TORCH_VERSION}" "cuda-toolkit==13.0.2" "nvidia-cuda-runtime==13.0.96.*" "nvidia-cuda-cupti==13.0.85.*")
CUDA_PACKAGES=("torch==${TORCH_VERSION}")

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv="${SIMCLR_VENV:-$root/.venv}"
mode=cpu

usage() { echo "usage: scripts/setup.sh [--cuda]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) mode=cuda ;;
    -h|--help) sed -n '2,12p' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "setup: unknown option '$1'" >&2; usage ;;
  esac
  shift
done

# CharLS (the JPEG-LS codec behind dicom-pixeldata's `charls` feature) is C++ built with CMake.
if ! command -v cmake >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing cmake (builds CharLS, the JPEG-LS decoder)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q cmake >/dev/null; }
  else
    echo "setup: cmake not found; install it (Debian/Ubuntu: apt-get install cmake; it builds CharLS," \
         "the JPEG-LS decoder)" >&2
    exit 1
  fi
fi

check_libtorch() { # $1 = a libtorch directory (with lib/ and include/)
  [ -f "$1/lib/libtorch_cpu.so" ] && [ -d "$1/include/torch" ]
}

if [ -n "${LIBTORCH:-}" ]; then
  if check_libtorch "$LIBTORCH"; then
    echo "setup: using LIBTORCH=$LIBTORCH (no download)"
    exit 0
  fi
  echo "setup: LIBTORCH=$LIBTORCH does not hold libtorch (expected lib/libtorch_cpu.so and include/torch);" \
       "unset it to install libtorch into $venv" >&2
  exit 2
fi

if [ "$mode" = cuda ]; then packages=("${CUDA_PACKAGES[@]}"); else packages=("${CPU_PACKAGES[@]}"); fi
stamp="$venv/.simclr-setup"
want="$mode ${packages[*]}"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && check_libtorch "$venv/libtorch"; then
  echo "setup: $venv is up to date ($mode, torch $TORCH_VERSION)"
  exit 0
fi

python=${PYTHON:-python3}
command -v "$python" >/dev/null || { echo "setup: $python not found; install Python 3.10+ or set PYTHON" >&2; exit 1; }
"$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || { echo "setup: $python is older than 3.10, which torch $TORCH_VERSION needs" >&2; exit 1; }

echo "setup: installing torch $TORCH_VERSION ($mode) into $venv"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip_args=(--disable-pip-version-check --no-input --quiet)
if [ "$mode" = cuda ]; then
  "$venv/bin/pip" install "${pip_args[@]}" "${packages[@]}"
else
  "$venv/bin/pip" install "${pip_args[@]}" --no-deps "${packages[@]}"
fi

site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# A relative link, so that the environment can be moved with the checkout.
ln -sfn "$(realpath --relative-to="$venv" "$site/torch")" "$venv/libtorch"
check_libtorch "$venv/libtorch" || { echo "setup: $site/torch does not hold libtorch after install" >&2; exit 1; }
echo "$want" > "$stamp"
echo "setup: done; LIBTORCH=$venv/libtorch ($(du -sh "$venv" | cut -f1))"
