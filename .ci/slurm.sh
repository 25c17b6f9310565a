#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for tests/test_slurm_real.py (`make test-slurm`).
#
#   bash .ci/slurm.sh start   # install (CI=true or SLURM_INSTALL=1), write slurm.conf, start munged,
#                             # slurmctld and slurmd, wait until the node is idle
#   bash .ci/slurm.sh stop    # stop the three daemons this script started and remove their state
#
# Debian's packages (slurm-wlm, munge), no systemd and no cgroups: proctrack/linuxproc, task/none,
# select/cons_tres on cores only (memory is not a consumable, so two 1-CPU jobs run side by side).
# No accounting database: sacct is unavailable, and the grid polls squeue instead.
# Everything lives in $SLURM_STATE_DIR (default /tmp/histotoken-slurm); /etc/slurm/slurm.conf is written
# only when absent (or when this script wrote it) and removed again by `stop`. Needs root (or sudo).
set -euo pipefail

STATE="${SLURM_STATE_DIR:-/tmp/histotoken-slurm}"
CONF=/etc/slurm/slurm.conf
MARK="# written by histotoken .ci/slurm.sh"
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi

install_packages() {
    if command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1; then
        return
    fi
    if [ "${CI:-}" = "true" ] || [ "${SLURM_INSTALL:-}" = "1" ]; then
        $SUDO apt-get update
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends slurm-wlm munge
    else
        echo "slurm.sh: slurmctld/munged are not installed; run with SLURM_INSTALL=1 (or CI=true) to" \
             "apt-get install slurm-wlm munge" >&2
        exit 1
    fi
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        echo "slurm.sh: $CONF exists and was not written by this script; refusing to replace it" >&2
        exit 1
    fi
    local host node
    host="$(hostname -s)"
    # `slurmd -C` prints this node's NodeName=... CPUs=... RealMemory=... line (and an UpTime line)
    node="$(slurmd -C | grep '^NodeName=')"
    $SUDO mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
    $SUDO tee "$CONF" >/dev/null <<EOF
$MARK (remove with: bash .ci/slurm.sh stop)
ClusterName=histotoken-ci
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# a requeued job waits cred_expire seconds before it may start again (default 120)
AuthInfo=cred_expire=10
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=5
# at the time limit: SIGTERM, then SIGKILL KillWait seconds later; no grace beyond the limit
KillWait=15
OverTimeLimit=0
MinJobAge=600
$node State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start_munge() {
    if munge -n >/dev/null 2>&1 </dev/null; then
        return  # a munged is already running (the machine's own): use it
    fi
    $SUDO mkdir -p /run/munge /var/log/munge /var/lib/munge
    if [ ! -s /etc/munge/munge.key ]; then
        $SUDO mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
            || $SUDO dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    $SUDO chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
    $SUDO chmod 0700 /etc/munge
    $SUDO chmod 0400 /etc/munge/munge.key
    $SUDO -u munge munged 2>/dev/null || $SUDO runuser -u munge -- munged
    local waited=0
    until [ -s /run/munge/munged.pid ] || [ "$waited" -ge 20 ]; do sleep 0.5; waited=$((waited + 1)); done
    $SUDO cp /run/munge/munged.pid "$STATE/munged.pid" 2>/dev/null \
        || echo "slurm.sh: munged wrote no pid file; stop will not stop it" >&2
}

wait_idle() {
    local waited=0
    until sinfo -h -o '%T' 2>/dev/null | grep -qx 'idle'; do
        sleep 1
        waited=$((waited + 1))
        if [ "$waited" -ge 60 ]; then
            echo "slurm.sh: the node is not idle after 60 s: sinfo says '$(sinfo -h -o '%T %E' 2>&1)'" >&2
            echo "slurm.sh: logs: $STATE/slurmctld.log $STATE/slurmd.log" >&2
            exit 1
        fi
    done
    echo "slurm.sh: single-node SLURM up after ${waited} s: $(sinfo -h -o '%P %D %c CPUs %m MB %T')"
}

start() {
    install_packages
    $SUDO mkdir -p "$STATE"
    write_conf
    start_munge
    $SUDO slurmctld -i   # -i: ignore saved state (a fresh cluster every time)
    $SUDO slurmd
    wait_idle
}

stop_pidfile() {
    local file="$1" pid
    if [ -f "$file" ]; then
        pid="$(cat "$file")"
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            $SUDO kill "$pid" || true
            for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        fi
    fi
}

stop() {
    if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
        scancel --user "$(id -un)" 2>/dev/null || true
        for _ in $(seq 30); do  # let slurmd end the jobs' processes before it stops
            [ -z "$(squeue -h -t running,completing,configuring 2>/dev/null)" ] && break
            sleep 1
        done
    fi
    stop_pidfile "$STATE/slurmd.pid"
    stop_pidfile "$STATE/slurmctld.pid"
    stop_pidfile "$STATE/munged.pid"  # only when this script started munged
    if [ -f "$CONF" ] && grep -qF "$MARK" "$CONF"; then
        $SUDO rm -f "$CONF"
    fi
    $SUDO rm -rf "$STATE"
    echo "slurm.sh: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) echo "usage: bash .ci/slurm.sh start|stop" >&2; exit 2 ;;
esac
