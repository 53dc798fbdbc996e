#!/usr/bin/env bash
# Stop the one-node test cluster started by .ci/slurm-up.sh (slurmd, slurmctld, munged), by
# the pids they wrote. Leaves /etc/slurm/slurm.conf and the state directory in place.
set -uo pipefail
dir=${SYNCBENCH_SLURM_DIR:-/tmp/syncbench-slurm}
grep -qs "written by syncbench .ci/slurm-up.sh" /etc/slurm/slurm.conf || exit 0  # not our cluster: leave it
scancel --user "$(id -un)" 2>/dev/null || true
pidfiles=("$dir/slurmd.pid" "$dir/slurmctld.pid")
[ -e "$dir/munged.ours" ] && pidfiles+=(/run/munge/munged.pid) && rm -f "$dir/munged.ours"
for pidfile in "${pidfiles[@]}"; do
  [ -s "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  kill "$pid" 2>/dev/null || continue
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
done
exit 0
