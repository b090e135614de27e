#!/usr/bin/env bash
# Pretraining with many workers on this one machine: the same short job (tiny encoder, 32 x 32 inputs,
# global batch 64, synchronised BatchNorm, TCP ring) with 1, 2, 4, ... 32 workers, 4 workers per
# simulated host (`dev --simulate-hosts`), release build. Prints one table row per worker count from
# the run's pretrain.json (rank 0): seconds per step (pretraining without data loading, over all
# steps), of which in collectives (the step's own: synchronised BatchNorm, the projections' gather,
# the key gradients, on the main channel; and the gradient buckets on their channel), and of which
# the training thread waited for; then images/s of the cluster, and the whole job's wall time (with a
# probe sweep of 12 tasks) and the coordinator's own CPU time and peak memory (coordinator.json). On a 2-core machine every worker
# shares two cores, so the compute per step does not shrink with more workers: the table shows how
# the collectives' cost grows with the number of ranks.
#   scripts/bench_scale.sh [WORKER_COUNT ...]       (default: 1 2 4 8 16 32)
# SCALE_PRETRAIN="bn = \"local\"" (or "bn_group_size = 4", ...) adds lines to the job's [pretrain].
# SIMCLR_COLLECTIVE_ALGORITHM=ring (the workers inherit it) runs every collective on the ring, the
# small ones too, and BatchNorm groups' exchanges over the whole world: the "before" of Bruck's.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
counts=("$@")
[ ${#counts[@]} -gt 0 ] || counts=(1 2 4 8 16 32)
scripts/setup.sh >/dev/null
cargo build -q --release --bins --locked
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cat > "$work/job.toml" <<TOML
[job]
id = "bench-scale"

[data]
synthetic_studies = 400
synthetic_size = 64

[pretrain]
arch = "tiny"
head_out = 16
input_size = 32
batch_size = 64
epochs = 3
warmup_epochs = 0.5
checkpoint_every = 0
${SCALE_PRETRAIN:-}

[probe]
hidden = [8]
epochs = [5]
seeds = 2
bootstrap = 20
TOML
echo "| workers | simulated hosts | steps | s/step | main channel: s/step | gradient channel: s/step | exposed: s/step | cluster images/s | job s | coordinator CPU s | coordinator peak RSS |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for n in "${counts[@]}"; do
  hosts=$(( (n + 3) / 4 ))
  run="$work/w$n"
  if ! SIMCLR_CACHE_DIR="$work/cache" RUST_LOG=warn target/release/simclr-coordinator dev --workers "$n" \
      --simulate-hosts "$hosts" --config "$work/job.toml" --run-dir "$run" > "$work/w$n.log" 2>&1; then
    echo "| $n | $hosts | failed: see the log below | | | | | | | | |"
    tail -20 "$work/w$n.log"
    continue
  fi
  python3 - "$run/pretrain.json" "$n" "$hosts" "$run/coordinator.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
usage = json.load(open(sys.argv[4]))
r = doc["ranks"]["0"]
steps = r["steps_this_run"]
step = (r["seconds"] - r["data_seconds"]) / steps
gradients = r.get("gradient_communication_seconds", 0.0)
main = r["communication_seconds"] - gradients
exposed = r.get("exposed_communication_seconds", r["communication_seconds"])
print(f"| {sys.argv[2]} | {sys.argv[3]} | {steps:.0f} | {step:.3f} | {main / steps:.3f} | {gradients / steps:.3f} "
      f"| {exposed / steps:.3f} | {doc['cluster']['cluster_images_per_s']:.0f} | {usage['wall_seconds']:.1f} "
      f"| {usage['cpu_seconds']:.2f} | {usage['max_rss_bytes'] / 2**20:.0f} MiB |")
PY
done
