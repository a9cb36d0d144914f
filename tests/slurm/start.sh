#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for the tests that run the sweep against real sbatch/squeue
# (tests/test_slurm_real.py). Root only: slurmd runs the jobs as their submitting user.
#
#   tests/slurm/start.sh [DIR]    install slurm-wlm and munge from the distribution when they are missing
#                                 (apt-get), write DIR/slurm.conf for this host and start munged, slurmctld and
#                                 slurmd; returns once the node is idle. A cluster already running from DIR is
#                                 reused (running this twice is fine).
#   tests/slurm/stop.sh [DIR]     stop the daemons started from DIR.
#
# DIR defaults to $MIQ_SLURM_DIR or /tmp/miq-slurm; it holds the configuration, the controller's state, the
# nodes' spool and the logs. The commands find the cluster through SLURM_CONF=DIR/slurm.conf (the last line
# printed), so a system Slurm configuration, if any, is left alone. No accounting: sacct answers nothing, as
# on many small clusters. Prints "slurm: started ..." or "slurm: reused ...", then "export SLURM_CONF=...".
# On failure one line on stderr: exit 3 where it cannot run here (not root, the packages not installable),
# exit 1 where it should have (a daemon that does not come up: its log is named).
set -euo pipefail

DIR=$(realpath -m "${1:-${MIQ_SLURM_DIR:-/tmp/miq-slurm}}")
CONF=$DIR/slurm.conf
fail() { echo "tests/slurm/start.sh: $*" >&2; exit 1; }
cannot() { echo "tests/slurm/start.sh: $*" >&2; exit 3; }

[ "$(id -u)" = 0 ] || cannot "not root (uid $(id -u)): starting slurmd and munged needs root"
mkdir -p "$DIR"/{state,spool,log,run}

# --- packages --------------------------------------------------------------------------------------------
need=()
for c in slurmctld slurmd sbatch squeue sinfo scontrol; do command -v "$c" >/dev/null || need=(slurm-wlm); done
command -v munged >/dev/null || need+=(munge)
if [ ${#need[@]} -gt 0 ]; then
    command -v apt-get >/dev/null || cannot "${need[*]} not installed and no apt-get to install them"
    export DEBIAN_FRONTEND=noninteractive
    # policy-rc.d: the packages' scripts must not start the system's own daemons (this script starts them
    # with its own configuration); it is removed again, whatever happens
    policy=/usr/sbin/policy-rc.d
    own_policy=
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' >$policy && chmod +x $policy && own_policy=1; fi
    trap '[ -n "$own_policy" ] && rm -f $policy' EXIT
    { apt-get -o DPkg::Lock::Timeout=300 update -q &&
      apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends "${need[@]}"; } \
        >"$DIR/log/apt.log" 2>&1 ||
        cannot "apt-get install ${need[*]} failed: $(grep -E '^E:' "$DIR/log/apt.log" | tail -1) (see $DIR/log/apt.log)"
fi

# --- munge: /run/munge owned by munge, a key, munged running as munge ---------------------------------------
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    id munge >/dev/null 2>&1 || fail "no munge user (is the munge package installed?)"
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    if [ ! -s /etc/munge/munge.key ]; then
        (umask 077 && dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    runuser -u munge -- munged >"$DIR/log/munged.out" 2>&1 || fail "munged did not start: $(tail -1 "$DIR/log/munged.out")"
    for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
    munge -n </dev/null | unmunge >/dev/null 2>&1 || fail "munged started but does not answer (see /var/log/munge/munged.log)"
fi

# --- slurm.conf for this host ------------------------------------------------------------------------------
export SLURM_CONF=$CONF
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
real_mb=$((mem_mb - mem_mb / 10 > 1024 ? mem_mb - mem_mb / 10 : mem_mb / 2))  # a tenth (or half) left to the system
alive() { [ -s "$DIR/run/$1.pid" ] && kill -0 "$(cat "$DIR/run/$1.pid")" 2>/dev/null; }

how=reused
if ! { alive slurmctld && alive slurmd; }; then
    how=started
    [ -x "$0" ] && "$(dirname "$0")/stop.sh" "$DIR" >/dev/null 2>&1 || true  # one of the two alone: start over
    cat >"$CONF" <<EOF
# written by tests/slurm/start.sh for $host: one node, one partition, no accounting
ClusterName=miq-test
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# a requeued job may start again 10 s after (default 120 s: the job credential's lifetime)
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=$((real_mb / cpus))
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
SlurmdParameters=config_overrides
# a job past its time limit or cancelled is SIGKILLed 5 s after its SIGTERM (default 30 s)
KillWait=5
MinJobAge=300
SchedulerType=sched/backfill
# the scheduler looks every few seconds (a requeued job waiting on its BeginTime starts soon after it)
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$real_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
    slurmctld -c -f "$CONF" >"$DIR/log/slurmctld.out" 2>&1 ||
        fail "slurmctld did not start: $(tail -1 "$DIR/log/slurmctld.out") (see $DIR/log/slurmctld.log)"
    slurmd -f "$CONF" >"$DIR/log/slurmd.out" 2>&1 ||
        fail "slurmd did not start: $(tail -1 "$DIR/log/slurmd.out") (see $DIR/log/slurmd.log)"
fi

# --- the node idle ------------------------------------------------------------------------------------------
state=
for _ in $(seq 120); do
    state=$(sinfo -h -N -n "$host" -o %T 2>/dev/null | head -1 || true)
    case $state in
        idle|mixed|allocated) break ;;
        drain*|down*) scontrol update nodename="$host" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 0.5
done
case $state in
    idle|mixed|allocated) ;;
    *) fail "node $host is '${state:-not answering}' after 60 s (see $DIR/log/slurmctld.log and slurmd.log)" ;;
esac
echo "slurm: $how node $host ($cpus CPUs, $real_mb MB) from $DIR"
echo "export SLURM_CONF=$CONF"
