#!/usr/bin/env bash
# A one-node SLURM cluster on this machine for tests/test_slurm.py: munged, slurmctld and slurmd
# (node "localhost", CPUs=2), process tracking by /proc (no cgroups), no task plugin, jobs run as
# the submitting user. Idempotent: a cluster that answers `sinfo` is left as it is.
# Needs root and the Debian packages slurm-wlm and munge (.ci/run installs them).
# State, logs and the pid files live in $SYNCBENCH_SLURM_DIR (default /tmp/syncbench-slurm);
# .ci/slurm-down.sh stops the daemons.
set -euo pipefail
dir=${SYNCBENCH_SLURM_DIR:-/tmp/syncbench-slurm}
conf=/etc/slurm/slurm.conf
if timeout 5 sinfo -h >/dev/null 2>&1; then
  echo "slurm-up: a cluster already answers sinfo"; exit 0
fi
if [ -f "$conf" ] && ! grep -q "written by syncbench .ci/slurm-up.sh" "$conf"; then
  echo "slurm-up: $conf exists and is not ours: not overwriting a real cluster's configuration" >&2; exit 1
fi
mkdir -p "$dir"/{state,spool,log} /run/munge /etc/slurm
chown munge:munge /run/munge
chmod 0755 /run/munge
# munge: the key the Debian package generated; one is made when missing
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
fi
if ! pgrep -u munge -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
  touch "$dir/munged.ours"  # slurm-down.sh stops only the munged started here
fi
mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)  # MB, leaving the OS its share
host=$(hostname -s)
cat > "$conf" <<CONF
# written by syncbench .ci/slurm-up.sh: a one-node test cluster
ClusterName=syncbench-ci
SlurmctldHost=${host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdTimeout=60
# a cancelled job's processes get SIGTERM, then this long before SIGKILL (SLURM's default: a loaded
# machine needs it for a launcher to record its trial KILLED and re-enqueue it)
KillWait=30
MinJobAge=600
InactiveLimit=0
# the machine has 2 cores: jobs share them (a launcher job waiting on its dist-trial job holds one)
NodeName=localhost NodeAddr=127.0.0.1 NodeHostname=localhost CPUs=2 RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
/usr/sbin/slurmctld -i
/usr/sbin/slurmd -N localhost
for _ in $(seq 1 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    sinfo; exit 0
  fi
  sleep 0.5
done
echo "slurm-up: the node did not come up; logs follow" >&2
tail -n 30 "$dir"/log/*.log >&2 || true
exit 1
