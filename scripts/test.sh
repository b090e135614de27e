#!/usr/bin/env bash
# The README's test command: set-up (libtorch into .venv, a no-op once done), build, and the whole test
# suite (unit tests of every crate, then the loopback cluster tests with real worker processes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --python
cargo build --workspace --all-targets --locked
cargo test --workspace --locked "$@"
