#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the tests marked `slurm`: `up` installs slurm-wlm and munge if they
# are missing (apt, as root), writes the configuration and starts munged, slurmctld and slurmd; `down` stops them.
# Idempotent: `up` on a running cluster only waits for the node to be idle. Exit 3: cannot be set up here (no root,
# no apt), with the reason on stderr.
set -euo pipefail
action=${1:-up}
node=$(hostname -s)
conf=/etc/slurm/slurm.conf

stop() {
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    pkill -x munged 2>/dev/null || true
}

if [ "$action" = down ]; then
    stop
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "a local SLURM cluster needs root (to install packages and start the daemons)" >&2
    exit 3
fi
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    if ! command -v apt-get >/dev/null; then
        echo "slurm-wlm and munge are not installed and there is no apt-get to install them" >&2
        exit 3
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && \
        apt-get install -y -q slurm-wlm munge >/dev/null 2>&1; } || { echo "apt-get could not install slurm-wlm" >&2; exit 3; }
fi
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/munge /var/lib/munge /var/log/munge
cpus=$(nproc)
memory=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
wanted=$(cat <<CONF
ClusterName=local
SlurmctldHost=$node
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldTimeout=30
SlurmdTimeout=30
KillWait=5
NodeName=$node CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=debug Nodes=$node Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
CONF
)
if [ ! -f $conf ] || [ "$(cat $conf)" != "$wanted" ]; then
    echo "$wanted" > $conf
    stop
fi
if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 2>/dev/null
    chmod 400 /etc/munge/munge.key
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
pgrep -x munged >/dev/null || su -s /bin/sh munge -c munged 2>/dev/null || munged --force
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 60); do
    state=$(sinfo -h -N -o %T 2>/dev/null | head -1 || true)
    case "$state" in
        idle|mixed|allocated) exit 0 ;;
        down*|drain*) scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
echo "the local SLURM node did not become idle in 60 s (state: ${state:-none}); see /var/log/slurm/" >&2
exit 3
