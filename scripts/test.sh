#!/usr/bin/env bash
# The README's test command: set-up (libtorch into .venv, a no-op once done), build, and the whole test
# suite (unit tests of every crate, then the loopback cluster tests with real worker processes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh --python --k8s
# The set-up above links the wheel's NCCL, so the NCCL probe test must find it (not only explain its absence).
export SIMCLR_EXPECT_NCCL=1
# The set-up above installs kubectl, kubernetes-validate and prometheus_client, so the tests that use
# them must run (not skip).
export SIMCLR_EXPECT_TOOLS=1
cargo build --workspace --all-targets --locked
cargo test --workspace --locked "$@"
