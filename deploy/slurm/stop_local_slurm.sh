#!/usr/bin/env bash
# Stop the single-node SLURM started by start_local_slurm.sh: cancel the jobs still queued or
# running, then stop slurmd, slurmctld and munged by the process ids in their own pidfiles
# (TERM, then KILL after 10 s). Idempotent: does nothing for daemons that are not running.
# Leaves packages, /etc/slurm and the spool directories in place (a restart is then quick).
set -uo pipefail

log() { echo "stop_local_slurm: $*" >&2; }
[ "$(id -u)" = "0" ] || { log "error: must run as root"; exit 1; }

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {  # stop_pidfile NAME PIDFILE
    alive "$2" || { log "$1 not running"; return 0; }
    local pid; pid=$(cat "$2")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || { log "stopped $1 (pid $pid)"; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    log "killed $1 (pid $pid) after 10 s"
}

if alive /run/slurmctld.pid && command -v squeue >/dev/null; then
    jobs=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$jobs" ]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        scancel $jobs 2>/dev/null || true
        for _ in $(seq 150); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
fi

stop_pidfile slurmd /run/slurmd.pid
stop_pidfile slurmctld /run/slurmctld.pid
stop_pidfile munged /run/munge/munged.pid
exit 0
