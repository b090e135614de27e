#!/usr/bin/env bash
# Header indexing at scale: `simclr-coordinator inspect` (what a job's coordinator runs before anything
# else: every file's element structure walked, its header parsed and checked, studies and labels
# joined) on synthetic SIIM folders of growing size, with small images so that the file count, not the
# pixel volume, is what grows. Prints one row per size: files, seconds, files per second, seconds per
# 10,000 files, peak memory of the coordinator process; then pydicom on the largest folder, as a Python
# user would index it (scripts/bench_index_pydicom.py, in .venv-bench). The folders are generated once
# under target/bench-index/ (generation is not timed); the page cache is warm (a second pass).
#
#   scripts/bench_index.sh [STUDIES ...]      default: 2000 10000 40000
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
[ $# -gt 0 ] || set -- 2000 10000 40000
cargo build --locked --release -q -p simclr-coordinator --bin simclr-coordinator
bin=target/release/simclr-coordinator
echo "| studies | files | seconds | files/s | s per 10,000 files | peak RSS (MB) |"
echo "|---|---|---|---|---|---|"
for studies in "$@"; do
  dir="target/bench-index/s$studies"
  if [ ! -f "$dir/.complete" ]; then
    rm -rf "$dir"
    RUST_LOG=warn "$bin" synth --studies "$studies" --size 16 --out "$dir" >/dev/null
    touch "$dir/.complete"
  fi
  # Warm the page cache, then measure.
  RUST_LOG=warn "$bin" inspect --data "$dir" --json /dev/null >/dev/null 2>&1 || true
  RUST_LOG=warn /usr/bin/time -o target/bench-index/time.txt -f "%e %M" \
    "$bin" inspect --data "$dir" --json /dev/null >/dev/null 2>&1 || true
  out=$(tail -n 1 target/bench-index/time.txt)
  seconds=${out% *}
  rss_kb=${out#* }
  files=$(find "$dir" -name '*.dcm' | wc -l)
  awk -v s="$studies" -v f="$files" -v t="$seconds" -v m="$rss_kb" \
    'BEGIN { printf "| %d | %d | %.2f | %.0f | %.2f | %.0f |\n", s, f, t, f / t, t * 10000 / f, m / 1024 }'
done

if [ ! -x .venv-bench/bin/python ] || ! .venv-bench/bin/python -c 'import pydicom' 2>/dev/null; then
  python3 -m venv .venv-bench
  .venv-bench/bin/pip install --quiet --disable-pip-version-check "pydicom==3.0.1"
fi
echo
echo "pydicom $(.venv-bench/bin/python -c 'import pydicom; print(pydicom.__version__)') on the last folder (s${!#}):"
.venv-bench/bin/python scripts/bench_index_pydicom.py "target/bench-index/s${!#}"
