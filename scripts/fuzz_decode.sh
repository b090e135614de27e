#!/usr/bin/env bash
# Fuzzes the DICOM parse-and-decode entry point (simclr_data::pixels::decode_bytes) with cargo fuzz:
#   scripts/fuzz_decode.sh [SECONDS] [-- extra libFuzzer flags]
# Seeds: data/tests/fixtures/codecs (every transfer syntax, written by GDCM and pydicom). The growing
# corpus stays in data/fuzz/corpus/decode; crashes land in data/fuzz/artifacts/decode, and each one
# found belongs in data/tests/fuzz_regressions.rs. cargo fuzz wants nightly flags (-Zsanitizer);
# RUSTC_BOOTSTRAP=1 lets the pinned stable toolchain accept them. Needs `cargo install cargo-fuzz`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../data/fuzz"
seconds=${1:-300}
shift || true
[ "${1:-}" = "--" ] && shift
command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz@0.13.2
mkdir -p corpus/decode
# rss 4 GiB, single allocations 2 GiB (under ASan): a 10 KB file that asks for gigabytes is a finding.
RUSTC_BOOTSTRAP=1 cargo fuzz run decode corpus/decode ../tests/fixtures/codecs -- \
  -max_total_time="$seconds" -max_len=65536 -rss_limit_mb=4096 -malloc_limit_mb=2048 -timeout=10 "$@"
