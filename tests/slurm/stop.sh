#!/usr/bin/env bash
# Stop the single-node cluster tests/slurm/start.sh started from DIR (default $MIQ_SLURM_DIR or /tmp/miq-slurm):
# its jobs cancelled, then slurmd and slurmctld, each by the pid it wrote under DIR/run. munged is left
# running (it may serve another Slurm on this machine); DIR is kept (its logs).
set -uo pipefail

DIR=$(realpath -m "${1:-${MIQ_SLURM_DIR:-/tmp/miq-slurm}}")
export SLURM_CONF=$DIR/slurm.conf
[ -f "$SLURM_CONF" ] && command -v scancel >/dev/null && timeout 10 scancel --full --quiet --user=root 2>/dev/null
for d in slurmd slurmctld; do
    pidfile=$DIR/run/$d.pid
    [ -s "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    if kill "$pid" 2>/dev/null; then
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null
    fi
    rm -f "$pidfile"
done
exit 0
