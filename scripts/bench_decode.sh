#!/usr/bin/env bash
# Decode + preprocess throughput, ours against pydicom, on the same files in the same run.
#   scripts/bench_decode.sh [IMAGES_PER_SYNTAX] [SIDE]
# The Rust bench writes phantom radiographs per transfer syntax into target/bench-decode (once), GDCM
# transcodes them to JPEG lossless, JPEG-LS and JPEG 2000, and then both our decoder and pydicom (with
# numpy, Pillow and the JPEG plugins, in .venv-bench) read the very same files.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
n=${1:-100}
side=${2:-512}
packages=("pydicom==3.0.1" "numpy==2.2.6" "pillow==11.3.0" "python-gdcm==3.2.6" "pylibjpeg==2.1.0"
          "pylibjpeg-libjpeg==2.5.0" "pylibjpeg-openjpeg==2.6.0" "pyjpegls==1.5.1")
if [ ! -x .venv-bench/bin/python ] || ! .venv-bench/bin/python -c 'import gdcm, pylibjpeg, jpeg_ls' 2>/dev/null; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install --quiet --disable-pip-version-check "${packages[@]}"
fi
# The phantoms (our writer), then the JPEG-family copies of them (GDCM), then both readers on all of them.
cargo bench -q -p simclr-data --bench decode -- "$PWD/target/bench-decode" "$n" "$side" --write-only
.venv-bench/bin/python scripts/bench_pydicom.py --transcode "$PWD/target/bench-decode" "$side"
echo "## simclr-data (Rust)"
cargo bench -q -p simclr-data --bench decode -- "$PWD/target/bench-decode" "$n" "$side"
echo
echo "## pydicom $(.venv-bench/bin/python -c 'import pydicom; print(pydicom.__version__)') + numpy + Pillow (+ pylibjpeg, pyjpegls, GDCM for JPEG)"
.venv-bench/bin/python scripts/bench_pydicom.py "$PWD/target/bench-decode" "$side"
