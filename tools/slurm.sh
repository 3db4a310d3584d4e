#!/usr/bin/env bash
# A private single-node SLURM for testing the job scripts against a real scheduler
# (../shared/SLURM.md, as verified on the development and CI machines: Debian 12, root).
#
#   bash tools/slurm.sh install   # apt packages slurmctld slurmd slurm-client munge (root; idempotent)
#   bash tools/slurm.sh start     # prints "export SLURM_CONF=..." on success; exit 1 with the reason if not
#   bash tools/slurm.sh stop      # ends the daemons it started, by the PIDs it recorded
#
# Everything lives in $HPCFLOW_SLURM_DIR (default /tmp/hpcflow-slurm): slurm.conf, state,
# spool, logs and PID files.  Clients find it through SLURM_CONF=$HPCFLOW_SLURM_DIR/slurm.conf;
# nothing under /etc/slurm is touched.  The only shared pieces are munged (started if none
# runs, with /etc/munge/munge.key created if missing) and the ports (6817/6818 by default,
# HPCFLOW_SLURM_PORTS=ctld,slurmd to change): "start" refuses when something else holds them,
# e.g. a site SLURM, so tests never submit to a real cluster by accident.
set -euo pipefail

DIR=${HPCFLOW_SLURM_DIR:-/tmp/hpcflow-slurm}
PORTS=${HPCFLOW_SLURM_PORTS:-6817,6818}
CTLD_PORT=${PORTS%,*}
SLURMD_PORT=${PORTS#*,}
CONF=$DIR/slurm.conf

say() { printf '[slurm] %s\n' "$*" >&2; }

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
    cpus=$(nproc)
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat >"$CONF" <<EOF
# written by hpcflow tools/slurm.sh: a private single-node SLURM for tests
ClusterName=hpcflowtest
SlurmctldHost=$host
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
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
MinJobAge=600
NodeName=$host CPUs=$cpus State=UNKNOWN
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
        if SLURM_CONF=$CONF sinfo -h -o '%t' 2>/dev/null | grep -qx 'idle'; then
            echo "export SLURM_CONF=$CONF"
            return 0
        fi
        sleep 0.5
    done
    say "the node did not become idle within 20 s; see $DIR/log/"
    stop || true
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
    stop) stop ;;
    *) echo "usage: bash tools/slurm.sh install|start|stop" >&2; exit 2 ;;
esac
