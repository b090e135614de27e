#!/usr/bin/env bash
# A real one-node SLURM on this machine, for the sbatch test (tests/tests/slurm.rs) and for trying the
# sbatch script by hand: Debian's munge, slurmctld, slurmd and slurm-client, a slurm.conf written for
# this host (its CPUs and memory as `slurmd -C` reports them, two stand-in GPUs so that the script's
# --gpus-per-task directive is satisfiable on a CPU host), started as root.
#
#   scripts/slurm_local.sh start    install the packages where missing (apt-get, as root), write the
#                                   configuration under $SIMCLR_SLURM_DIR (default /tmp/simclr-slurm),
#                                   start munged, slurmctld and slurmd, wait for the node to be idle
#   scripts/slurm_local.sh stop     stop the three daemons this script started
#   scripts/slurm_local.sh env      print `export SLURM_CONF=...` for a shell that submits jobs
#
# The daemons read $SIMCLR_SLURM_DIR/slurm.conf (SLURM_CONF), never /etc/slurm, so a host that has its
# own SLURM configuration keeps it. Needs root (the daemons start jobs as the submitting user).
set -euo pipefail

dir="${SIMCLR_SLURM_DIR:-/tmp/simclr-slurm}"
conf="$dir/slurm.conf"

die() { echo "slurm_local: $*" >&2; exit 1; }

install_packages() {
  local missing=()
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  [ ${#missing[@]} -eq 0 ] && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || die "missing ${missing[*]}; install them (Debian: apt-get install ${missing[*]})"
  echo "slurm_local: installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null; }
}

write_config() {
  local host node
  host=$(hostname -s)
  # This host as slurmd sees it (NodeName=... CPUs=... Boards=... RealMemory=...).
  node=$(slurmd -C | head -n 1)
  mkdir -p "$dir/state" "$dir/spool" "$dir/log"
  cat > "$conf" <<CONF
# Written by scripts/slurm_local.sh: a one-node cluster on $host for tests.
ClusterName=simclr-local
SlurmctldHost=$host
SlurmUser=root
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=10
InactiveLimit=0
MpiDefault=none
$node Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
CONF
  # Two stand-in GPU device files: SLURM drops a GPU without one. Jobs then get CUDA_VISIBLE_DEVICES
  # as on a GPU node; libtorch finds no CUDA here, so the workers compute on the CPU.
  mkdir -p "$dir/dev"
  touch "$dir/dev/gpu0" "$dir/dev/gpu1"
  cat > "$dir/gres.conf" <<CONF
NodeName=$host Name=gpu File=$dir/dev/gpu[0-1]
CONF
  # Debian's plugstack.conf sits beside /etc/slurm/slurm.conf; the daemons look for it beside ours.
  : > "$dir/plugstack.conf"
}

start() {
  install_packages
  # Our slurmctld, not another process that inherited a stale pid.
  if [ -f "$dir/slurmctld.pid" ] && [ "$(cat "/proc/$(cat "$dir/slurmctld.pid")/comm" 2>/dev/null)" = slurmctld ]; then
    echo "slurm_local: already running ($conf)"
    return 0
  fi
  # A fresh cluster each time: no job or node state from an earlier start.
  rm -rf "$dir/state" "$dir/spool"
  write_config
  export SLURM_CONF="$conf"
  [ -f /etc/munge/munge.key ] || { mkdir -p /etc/munge; dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null; }
  chown munge:munge /etc/munge/munge.key 2>/dev/null || true
  chmod 0400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  if ! munge -n </dev/null >/dev/null 2>&1; then
    if id munge >/dev/null 2>&1; then runuser -u munge -- munged; else munged --force; fi
    echo munged > "$dir/started-munged"
    munge -n </dev/null >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
  fi
  rm -f "$dir/cgroup.conf"
  slurmctld -f "$conf" || { tail -n 20 "$dir/log/slurmctld.log" >&2; die "slurmctld did not start (log above)"; }
  slurmd -f "$conf" || { tail -n 20 "$dir/log/slurmd.log" >&2; die "slurmd did not start (log above)"; }
  local waited=0
  local state
  until state=$(sinfo -h -o %t 2>/dev/null) && [ "$state" = idle ]; do
    case "$state" in
      inval*|drain*|down*)
        sinfo -h -R >&2 || true
        die "the node is '$state' (reason above; logs in $dir/log)" ;;
    esac
    waited=$((waited + 1))
    if [ "$waited" -gt 60 ]; then
      echo "slurm_local: the node did not become idle within 60 s; logs in $dir/log" >&2
      tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
      exit 1
    fi
    sleep 1
  done
  echo "slurm_local: one-node SLURM up in ${waited} s (export SLURM_CONF=$conf)"
}

stop() {
  local pidfile pid
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$pidfile"
  done
  if [ -f "$dir/started-munged" ]; then
    pkill -x munged 2>/dev/null || true
    for _ in $(seq 50); do pgrep -x munged >/dev/null || break; sleep 0.2; done
    rm -f "$dir/started-munged"
  fi
  echo "slurm_local: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) echo "usage: scripts/slurm_local.sh start|stop|env" >&2; exit 2 ;;
esac
