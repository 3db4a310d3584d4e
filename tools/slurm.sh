#!/usr/bin/env bash
# A private single-node SLURM for testing the job scripts against a real scheduler
# (../shared/SLURM.md, as verified on the development and CI machines: Debian 12, root).
#
#   bash tools/slurm.sh install   # apt packages slurmctld slurmd slurm-client munge (root; idempotent)
#   bash tools/slurm.sh start     # prints "export SLURM_CONF=..." on success; exit 1 with the reason if not
#   bash tools/slurm.sh probe     # runs a trivial 2-task job (srun true); exit 1 with diagnostics if it does not complete
#   bash tools/slurm.sh diagnose  # node state and reason, queue with reasons, daemons, log tails
#   bash tools/slurm.sh stop      # ends the daemons it started, by the PIDs it recorded
#
# Everything lives in $HPCFLOW_SLURM_DIR (default /tmp/hpcflow-slurm): slurm.conf, state,
# spool, logs and PID files.  Clients find it through SLURM_CONF=$HPCFLOW_SLURM_DIR/slurm.conf;
# nothing under /etc/slurm is touched.  The only shared pieces are munged (started if none
# runs, with /etc/munge/munge.key created if missing) and the ports (6817/6818 by default,
# HPCFLOW_SLURM_PORTS=ctld,slurmd to change): "start" refuses when something else holds them,
# e.g. a site SLURM, so tests never submit to a real cluster by accident.  Daemons and clients
# talk over the loopback address (NodeAddr, SlurmctldHost), so name resolution of the host
# name cannot get in the way, and the node's own hardware report never drains it
# (SlurmdParameters=config_overrides).
set -euo pipefail

DIR=${HPCFLOW_SLURM_DIR:-/tmp/hpcflow-slurm}
PORTS=${HPCFLOW_SLURM_PORTS:-6817,6818}
CTLD_PORT=${PORTS%,*}
SLURMD_PORT=${PORTS#*,}
CONF=$DIR/slurm.conf

say() { printf '[slurm] %s\n' "$*" >&2; }

# The CPUs this machine gives us.  Plain nproc honours OMP_NUM_THREADS, which tools/env.sh
# sets to 1 for the ranks: a node declared with CPUs=1 then never runs a 2-task job.
cpus() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

running() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
       && command -v munged >/dev/null; then
        return 0
    fi
    if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
        say "slurmctld/slurmd/munge are missing and cannot be installed here (needs root and apt)"
        return 1
    fi
    say "apt-get install slurmctld slurmd slurm-client munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -qq && apt-get install -y -qq --no-install-recommends \
             slurmctld slurmd slurm-client munge >/dev/null; }
}

write_conf() {
    local host cpus
    host=$(hostname)
    cpus=$(cpus)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# written by hpcflow tools/slurm.sh: a private single-node SLURM for tests
ClusterName=hpcflowtest
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
ReturnToService=2
SlurmdParameters=config_overrides
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    [[ $(id -u) == 0 ]] || { say "needs root (the daemons run as SlurmUser=root)"; return 1; }
    command -v slurmctld >/dev/null || { say "slurmctld not installed: bash tools/slurm.sh install"; return 1; }
    if running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid"; then
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    for port in "$CTLD_PORT" "$SLURMD_PORT"; do
        if port_busy "$port"; then
            say "port $port is in use (another SLURM?); set HPCFLOW_SLURM_PORTS=ctld,slurmd"
            return 1
        fi
    done
    if ! pgrep -x munged >/dev/null; then
        mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
        [[ -f /etc/munge/munge.key ]] || dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
        chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
        chmod 400 /etc/munge/munge.key
        munged --force 2>/dev/null || { say "munged did not start"; return 1; }
    fi
    write_conf
    rm -rf "$DIR/state"/* "$DIR/spool"/*
    SLURM_CONF=$CONF slurmctld -f "$CONF" -i
    SLURM_CONF=$CONF slurmd -f "$CONF"
    local i
    for i in $(seq 1 40); do
        if SLURM_CONF=$CONF sinfo -h -n "$(hostname)" -o '%t' 2>/dev/null | grep -qx 'idle'; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    say "the node did not become idle within 20 s"
    diagnose >&2
    stop || true
    return 1
}

diagnose() {
    export SLURM_CONF=$CONF
    local f
    echo "--- node (sinfo -N: name, state, reason)"
    sinfo -N -h -o '%N %T %E' 2>&1 || true
    echo "--- queue (squeue: id, state, reason)"
    squeue -h -o '%i %T %r' 2>&1 || true
    echo "--- daemons"
    for f in slurmctld slurmd; do
        if running "$DIR/$f.pid"; then echo "$f running (pid $(cat "$DIR/$f.pid"))"; else echo "$f NOT running"; fi
    done
    for f in slurmctld slurmd; do
        echo "--- tail of $DIR/log/$f.log"
        tail -n 15 "$DIR/log/$f.log" 2>&1 || true
    done
}

probe() {
    export SLURM_CONF=$CONF
    # two tasks: what the job-script tests ask for (a 1-CPU machine cannot run them)
    local ntasks=2 id state=none i
    if ! id=$(sbatch --parsable -J hpcflow-probe -n "$ntasks" --time=2 -o /dev/null \
              --wrap 'srun true' 2>&1); then
        say "sbatch refused a trivial $ntasks-task job: $id"
        diagnose >&2
        return 1
    fi
    id=${id%%;*}
    for i in $(seq 1 120); do
        state=$(scontrol -o show job "$id" 2>/dev/null | grep -o 'JobState=[A-Z_]*' | cut -d= -f2)
        case $state in
            COMPLETED) return 0 ;;
            FAILED|CANCELLED|TIMEOUT|NODE_FAIL|BOOT_FAIL|OUT_OF_MEMORY|DEADLINE) break ;;
        esac
        sleep 0.5
    done
    say "a trivial $ntasks-task job (srun true) did not complete within 60 s: job $id $state"
    diagnose >&2
    scancel "$id" 2>/dev/null || true
    return 1
}

stop() {
    local f pid
    for f in "$DIR/slurmd.pid" "$DIR/slurmctld.pid"; do
        if running "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
        fi
        rm -f "$f"
    done
}

case ${1:-} in
    install) install ;;
    start) start ;;
    probe) probe ;;
    diagnose) diagnose ;;
    stop) stop ;;
    *) echo "usage: bash tools/slurm.sh install|start|probe|diagnose|stop" >&2; exit 2 ;;
esac
