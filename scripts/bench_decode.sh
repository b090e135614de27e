#!/usr/bin/env bash
# Decode + preprocess throughput, ours against pydicom, on the same files in the same run.
#   scripts/bench_decode.sh [IMAGES_PER_SYNTAX] [SIDE]
# The Rust bench writes phantom radiographs per transfer syntax into target/bench-decode (once), then
# times them; pydicom (with numpy and Pillow, in .venv-bench) reads the very same files.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-100}
side=${2:-512}
echo "## simclr-data (Rust)"
cargo bench -q -p simclr-data --bench decode -- "$PWD/target/bench-decode" "$n" "$side"
if [ ! -x .venv-bench/bin/python ]; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install --quiet --disable-pip-version-check "pydicom==3.0.1" "numpy==2.2.6" "pillow==11.3.0"
fi
echo
echo "## pydicom $(.venv-bench/bin/python -c 'import pydicom; print(pydicom.__version__)') + numpy + Pillow"
.venv-bench/bin/python scripts/bench_pydicom.py "$PWD/target/bench-decode" "$side"
