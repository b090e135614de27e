#!/usr/bin/env bash
# The README's main command: set-up (libtorch into .venv, a no-op once done), build, and the whole job
# on one machine in dev mode: a coordinator and N worker processes on 127.0.0.1. Extra arguments go to
# `simclr-coordinator dev` (for example --workers 4 --seed 1 --run-dir runs/demo).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --workspace --bins --locked
[ $# -gt 0 ] || set -- --workers 2 --config configs/demo.toml --run-dir runs/demo
exec target/debug/simclr-coordinator dev "$@"
