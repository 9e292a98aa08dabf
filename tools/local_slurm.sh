#!/usr/bin/env bash
# A real 2-node SLURM cluster on this host, for trying launch/slurm/ and for the test suite.
#
#   bash tools/local_slurm.sh install          apt-get the Debian packages (root), if sbatch is missing
#   bash tools/local_slurm.sh start [DIR]      munged + slurmctld + slurmd node1/node2; prints `export SLURM_CONF=...`
#   bash tools/local_slurm.sh stop [DIR]       stops the daemons started from DIR (munged is left running)
#
# DIR (default /tmp/kasa_ds_slurm) holds slurm.conf, state, spool and logs; nothing is written under /etc.
# Both nodes are this host (NodeAddr 127.0.0.1, slurmd ports 17001/17002), CPUs=2 each, partition "debug".
set -euo pipefail
cmd=${1:?usage: local_slurm.sh install|start|stop [DIR]}
dir=$(realpath -m "${2:-/tmp/kasa_ds_slurm}")
conf=$dir/slurm.conf

install_packages() {
  command -v sbatch >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "local_slurm: cannot install slurmd/slurmctld/munge (needs root and apt-get)" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmd slurmctld slurm-client munge >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurmd slurmctld \
         slurm-client munge >/dev/null; }
}

write_conf() {
  mkdir -p "$dir/state" "$dir/spoolnode1" "$dir/spoolnode2" "$dir/log"
  cat > "$conf" <<EOF
ClusterName=kasalocal
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again once its old credential expired (default 120 s): keep the tests' requeue short
AuthInfo=cred_expire=10
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd-%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
MpiDefault=none
JobRequeue=1
# SIGTERM to SIGKILL when a step is ended (default 30 s): a rank left blocked in a collective by a dead peer
# cannot act on SIGTERM, so the tests' dead-rank job ends 20 s sooner
KillWait=10
MinJobAge=600
SlurmctldPort=6817
SlurmdPort=6818
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17001 CPUs=2 RealMemory=4000 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port=17002 CPUs=2 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install_packages
  write_conf
  export SLURM_CONF=$conf
  if ! pgrep -x munged >/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge 2>/dev/null || true
    runuser -u munge -- munged
  fi
  stop_daemons quiet
  if (exec 3<>/dev/tcp/127.0.0.1/6817) 2>/dev/null; then
    echo "local_slurm: port 6817 is taken (another slurmctld?); stop it first: bash tools/local_slurm.sh stop <its DIR>" >&2
    return 1
  fi
  slurmctld -f "$conf"
  slurmd -f "$conf" -N node1
  slurmd -f "$conf" -N node2
  for _ in $(seq 60); do  # nodes register within a few seconds
    if [ "$(sinfo -h -o '%T' -p debug 2>/dev/null | grep -c idle)" -ge 1 ] && \
       [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -c idle)" = 2 ]; then
      echo "export SLURM_CONF=$conf"
      return 0
    fi
    sleep 1
  done
  echo "local_slurm: nodes did not become idle; see $dir/log" >&2
  sinfo -N >&2 || true
  return 1
}

stop_daemons() {
  for pidfile in "$dir"/slurmd-node1.pid "$dir"/slurmd-node2.pid "$dir"/slurmctld.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$pidfile"
  done
  [ "${1:-}" = quiet ] || echo "local_slurm: stopped the daemons of $dir"
}

case $cmd in
  install) install_packages ;;
  start) start ;;
  stop) stop_daemons ;;
  *) echo "usage: local_slurm.sh install|start|stop [DIR]" >&2; exit 2 ;;
esac
