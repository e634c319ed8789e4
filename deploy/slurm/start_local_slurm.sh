#!/usr/bin/env bash
# Bring up a single-node SLURM cluster on this machine, on loopback only, for cryodask's SLURM test
# (tests/test_slurm.py) and for trying `cryodask run --cluster slurm` on a workstation.
#
#   sudo bash deploy/slurm/start_local_slurm.sh      # then: sinfo; squeue
#   sudo bash deploy/slurm/stop_local_slurm.sh
#
# Debian/Ubuntu, run as root. Idempotent: installs slurm-wlm + munge with apt only when missing,
# creates the munge key only when missing, (re)writes /etc/slurm/slurm.conf, starts munged,
# slurmctld and slurmd only when they are not already running (restarts them when the
# configuration changed), and returns once the node is `idle`. Exit code 0 = ready.
#
# Settings (environment):
#   SLURM_CPUS         CPUs of the node (default: nproc)
#   SLURM_REALMEM_MB   memory of the node in MB (default: MemTotal - 1 GB)
#   SLURM_PARTITION    partition name (default: debug)
#   SLURM_SKIP_APT=1   never call apt-get (fail if the packages are missing)
#   SLURM_WAIT_S       how long to wait for the node to become idle (default: 60)
#
# Not for production: SlurmUser=root, no accounting, no cgroup containment (jobs are tracked
# through /proc). A real cluster is set up by its admins; cryodask only submits jobs to it.
set -euo pipefail

log() { echo "start_local_slurm: $*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" = "0" ] || die "must run as root (it installs packages and starts system daemons)"

NODE=$(hostname -s)
CPUS=${SLURM_CPUS:-$(nproc)}
PARTITION=${SLURM_PARTITION:-debug}
WAIT_S=${SLURM_WAIT_S:-60}
mem_total_mb=$(awk '/^MemTotal:/ {print int($2 / 1024)}' /proc/meminfo)
REALMEM=${SLURM_REALMEM_MB:-$(( mem_total_mb > 2048 ? mem_total_mb - 1024 : mem_total_mb ))}
DEFMEM=$(( REALMEM / CPUS ))

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid

# ---- 1. packages ----------------------------------------------------------------------------
need_pkgs=()
for bin in /usr/sbin/slurmctld:slurmctld /usr/sbin/slurmd:slurmd /usr/bin/sbatch:slurm-client \
           /usr/sbin/munged:munge; do
    [ -x "${bin%%:*}" ] || need_pkgs+=("${bin##*:}")
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
    [ "${SLURM_SKIP_APT:-0}" = "1" ] && die "missing ${need_pkgs[*]} and SLURM_SKIP_APT=1"
    command -v apt-get >/dev/null || die "missing ${need_pkgs[*]}; this script only knows apt-get (Debian/Ubuntu)"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # the packages' postinst scripts try to start services; without systemd that is refused
    # ("policy-rc.d denied execution of start"), which is fine: the daemons are started below
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# ---- 2. host name must resolve (controller and node talk over 127.0.0.1) -------------------
if ! getent hosts "$NODE" >/dev/null; then
    log "adding '127.0.0.1 $NODE' to /etc/hosts"
    echo "127.0.0.1 $NODE" >> /etc/hosts
fi

# ---- 3. munge -------------------------------------------------------------------------------
install -d -m 0700 -o munge -g munge /etc/munge /var/lib/munge /var/log/munge
install -d -m 0755 -o munge -g munge /run/munge
if [ ! -s /etc/munge/munge.key ]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null; then
        mungekey --create --keyfile=/etc/munge/munge.key
    else
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

alive() {  # alive PIDFILE: the pid in the file is a running process
    [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

if ! alive "$MUNGE_PID"; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
fi
for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || die "munge does not work (see /var/log/munge/munged.log)"

# ---- 4. slurm.conf --------------------------------------------------------------------------
install -d "$CONF_DIR" /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
new_conf=$(mktemp)
trap 'rm -f "$new_conf"' EXIT
cat > "$new_conf" <<EOF
# Single-node SLURM on loopback, written by cryodask deploy/slurm/start_local_slurm.sh
ClusterName=cryodask-local
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmctldPort=6817
SlurmdPort=6818
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
MailProg=/bin/true
# no containment: processes are tracked through /proc, no cgroup plugins are loaded
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerType=sched/backfill
# cores and memory are consumable, so several small jobs (Dask workers) share the node;
# a job without --mem gets DefMemPerCPU per CPU instead of the whole node
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$DEFMEM
ReturnToService=2
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
MinJobAge=60
KillWait=10
Waittime=0
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$REALMEM State=UNKNOWN
PartitionName=$PARTITION Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF

changed=0
if ! cmp -s "$new_conf" "$CONF"; then
    changed=1
    install -m 0644 "$new_conf" "$CONF"
    log "wrote $CONF (node $NODE: $CPUS CPUs, $REALMEM MB; partition $PARTITION)"
fi

stop_pidfile() {  # stop_pidfile PIDFILE: TERM the pid in the file, KILL after 10 s
    alive "$1" || return 0
    local pid; pid=$(cat "$1")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
}

if [ "$changed" = "1" ] && { alive "$CTLD_PID" || alive "$SLURMD_PID"; }; then
    log "configuration changed: restarting slurmd and slurmctld"
    stop_pidfile "$SLURMD_PID"
    stop_pidfile "$CTLD_PID"
fi

# ---- 5. daemons -----------------------------------------------------------------------------
if ! alive "$CTLD_PID"; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
fi
for _ in $(seq $(( WAIT_S * 5 ))); do
    scontrol ping 2>/dev/null | grep -q 'is UP' && break
    sleep 0.2
done
scontrol ping 2>/dev/null | grep -q 'is UP' || { tail -n 20 /var/log/slurm/slurmctld.log >&2 || true; die "slurmctld did not come up"; }

if ! alive "$SLURMD_PID"; then
    log "starting slurmd"
    /usr/sbin/slurmd -N "$NODE"
fi

# ---- 6. wait for the node -------------------------------------------------------------------
state=""
for _ in $(seq $(( WAIT_S * 5 ))); do
    state=$(sinfo -h -n "$NODE" -o %t 2>/dev/null | head -n1 | tr -d '*~#!%$@^-')
    case "$state" in
        idle|mix|alloc) break ;;
        down|drain|drng|fail|failg)
            scontrol update NodeName="$NODE" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
case "$state" in
    idle|mix|alloc) log "ready: node $NODE is $state in partition $PARTITION" ;;
    *) tail -n 20 /var/log/slurm/slurmd.log >&2 || true
       die "node $NODE is '${state:-unknown}' after ${WAIT_S} s (logs: /var/log/slurm/)" ;;
esac
