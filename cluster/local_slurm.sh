#!/usr/bin/env bash
# A real single-node SLURM cluster on a Debian machine, for tests and for trying the
# sbatch scripts without a cluster. Debian's slurm-wlm and munge packages; the daemons
# are started without systemd (containers rarely have it) and stopped by the PIDs they
# recorded in their pid files.
#
#   cluster/local_slurm.sh install   apt-get install slurm-wlm munge (root, Debian)
#   cluster/local_slurm.sh start     write slurm.conf, start munged, slurmctld, slurmd; wait for an idle node
#   cluster/local_slurm.sh stop      stop the three daemons by their recorded PIDs
#   cluster/local_slurm.sh status    daemons, node state, queue
#   cluster/local_slurm.sh munge     start munged only (shared with cluster/local_slurm_hosts.sh)
#   cluster/local_slurm.sh stop-munge  stop munged unless this cluster's daemons run
#   cluster/local_slurm.sh conf-policy the slurm.conf settings both local clusters share
#
# Every command is idempotent. Accounting (slurmdbd + MariaDB, needed by `sacct`) is
# deliberately not installed: it doubles the install and start time. Finished jobs stay
# visible to `scontrol show job` for MinJobAge seconds, and every job end (including
# each requeue) is appended to the job-completion log $JOBCOMP_LOG.
set -euo pipefail

SLURM_CONF_FILE=${SLURM_CONF:-/etc/slurm/slurm.conf}
RUN_DIR=/run/slurm
SPOOL_CTLD=/var/spool/slurmctld
SPOOL_D=/var/spool/slurmd
LOG_DIR=/var/log/slurm
JOBCOMP_LOG=$LOG_DIR/jobcomp.log
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
# Marks a slurm.conf written by this script, so `start` never overwrites a real cluster's.
CONF_MARK="# written by hnet-pretrain cluster/local_slurm.sh"
START_TIMEOUT_S=${LOCAL_SLURM_START_TIMEOUT_S:-60}

die() { echo "local_slurm: $*" >&2; exit 1; }
log() { echo "local_slurm: $*"; }

need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts daemons)"; }

need_debian() {
    [[ -r /etc/debian_version ]] || die "needs Debian (or a derivative): /etc/debian_version not found"
}

installed() { command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && command -v sbatch >/dev/null; }

cmd_install() {
    need_root; need_debian
    if installed; then log "already installed ($(slurmctld -V))"; return 0; fi
    export DEBIAN_FRONTEND=noninteractive
    # The package index may be empty in a fresh container; refresh it only when the
    # packages are unknown, so a repeated install stays offline.
    if ! apt-cache show slurm-wlm >/dev/null 2>&1; then apt-get update -q; fi
    if ! apt-get install -y -q --no-install-recommends slurm-wlm munge; then
        # A stale index points at package versions the mirror no longer has.
        apt-get update -q
        apt-get install -y -q --no-install-recommends slurm-wlm munge
    fi
    installed || die "install finished but slurmctld/slurmd/munged/sbatch are missing"
    log "installed $(slurmctld -V)"
}

# pid_alive PIDFILE NAME: the pid in PIDFILE runs a process called NAME (a reused pid
# that now belongs to something else does not count).
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm ]] || return 1
    [[ $(</proc/$pid/comm) == "$name" ]]
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    local deadline=$((SECONDS + limit))
    until "$@"; do
        (( SECONDS < deadline )) || return 1
        sleep 0.2
    done
}

cpu_count() { env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc; }

# conf_policy: the settings both local clusters share (this one and cluster/local_slurm_hosts.sh's):
# daemons' users, munge, a fast requeue, no cgroups, no accounting, the job-completion log's type.
conf_policy() {
    cat <<'EOF'
SlurmUser=slurm
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may only start once the credentials of its previous run expired;
# 10 s instead of the default 120 s (with the scheduler interval below: a restart about 12 s after).
AuthInfo=cred_expire=10
# The scheduler runs every 2 s instead of on SLURM's 60 s (main) and 30 s (backfill) cycles: a
# requeued job starts once its hold ends (cred_expire), not up to half a minute later.
SchedulerParameters=sched_interval=2,bf_interval=2
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# A node that went down (daemon restart) comes back by itself.
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/filetxt
# Finished jobs stay visible to 'scontrol show job' for 10 min (no sacct here).
MinJobAge=600
# Seconds between SIGTERM and SIGKILL when a job or step is killed: short, so that a
# failing rank ends the job quickly.
KillWait=5
InactiveLimit=0
EOF
}

# write_conf: (re)writes slurm.conf; returns 1 when it was already up to date.
write_conf() {
    if [[ -e $SLURM_CONF_FILE ]] && ! grep -qF "$CONF_MARK" "$SLURM_CONF_FILE"; then
        die "$SLURM_CONF_FILE exists and was not written by this script; refusing to overwrite it"
    fi
    # nproc honours OMP_NUM_THREADS (set to 1 by the Makefile): count the CPUs without it.
    local cpus; cpus=$(cpu_count)
    mkdir -p "$(dirname "$SLURM_CONF_FILE")"
    local tmp="$SLURM_CONF_FILE.tmp.$$"
    cat >"$tmp" <<EOF
$CONF_MARK
# A one-node cluster: node "localhost" with all $cpus CPUs, one partition "debug".
ClusterName=hnetlocal
SlurmctldHost=localhost
$(conf_policy)
StateSaveLocation=$SPOOL_CTLD
SlurmdSpoolDir=$SPOOL_D
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
JobCompLoc=$JOBCOMP_LOG
NodeName=localhost CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    if cmp -s "$tmp" "$SLURM_CONF_FILE"; then rm -f "$tmp"; return 1; fi
    mv "$tmp" "$SLURM_CONF_FILE"
}

node_state() { scontrol show node localhost 2>/dev/null | sed -n 's/.*State=\([A-Z+_]*\).*/\1/p' | head -1; }
node_idle_or_busy() { local s; s=$(node_state); [[ $s == IDLE* || $s == MIXED* || $s == ALLOCATED* ]]; }

start_munge() {
    if pid_alive "$MUNGE_PID" munged; then log "munged already running (pid $(<"$MUNGE_PID"))"; return; fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/lib/munge /var/log/munge /etc/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=128 status=none
    fi
    chown munge:munge /etc/munge/munge.key; chmod 0400 /etc/munge/munge.key
    rm -f /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
    su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$MUNGE_PID"
    wait_for 10 munged bash -c "munge -n | unmunge >/dev/null 2>&1" || die "munged does not answer (see /var/log/munge/munged.log)"
    log "munged started (pid $(<"$MUNGE_PID"))"
}

cmd_start() {
    need_root
    installed || die "SLURM is not installed: run '$0 install' first"
    local t0=$SECONDS
    local conf_changed=0
    if write_conf; then conf_changed=1; fi
    install -d -o slurm -g slurm -m 0755 "$RUN_DIR" "$SPOOL_CTLD" "$LOG_DIR"
    install -d -o root -g root -m 0755 "$SPOOL_D"
    start_munge
    if (( conf_changed )) && { pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; }; then
        # Node definitions only take effect on a restart (scontrol reconfigure refuses them).
        log "slurm.conf changed: restarting slurmctld and slurmd"
        stop_one "$SLURMD_PID" slurmd
        stop_one "$CTLD_PID" slurmctld
    fi
    if pid_alive "$CTLD_PID" slurmctld; then
        log "slurmctld already running (pid $(<"$CTLD_PID"))"
    else
        /usr/sbin/slurmctld -f "$SLURM_CONF_FILE"
        wait_for 20 slurmctld scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer (see $LOG_DIR/slurmctld.log)"
        log "slurmctld started (pid $(<"$CTLD_PID"))"
    fi
    if pid_alive "$SLURMD_PID" slurmd; then
        log "slurmd already running (pid $(<"$SLURMD_PID"))"
    else
        # -N: the node name in slurm.conf, whatever this machine's hostname is.
        /usr/sbin/slurmd -f "$SLURM_CONF_FILE" -N localhost
        wait_for 10 slurmd pid_alive "$SLURMD_PID" slurmd || die "slurmd did not start (see $LOG_DIR/slurmd.log)"
        log "slurmd started (pid $(<"$SLURMD_PID"))"
    fi
    if ! wait_for 15 "node idle" node_idle_or_busy; then
        # A node left DOWN/DRAINED by an earlier unclean stop: put it back in service.
        scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
    fi
    wait_for "$START_TIMEOUT_S" "node idle" node_idle_or_busy \
        || die "node 'localhost' is $(node_state), not idle, after ${START_TIMEOUT_S}s (see $LOG_DIR/)"
    log "node localhost is $(node_state) with $(cpu_count) CPUs; ready in $((SECONDS - t0)) s"
}

stop_one() {  # stop_one PIDFILE NAME
    local pidfile=$1 name=$2 pid
    if ! pid_alive "$pidfile" "$name"; then log "$name not running"; rm -f "$pidfile"; return; fi
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true  # it may be exiting already
    if ! wait_for 20 "$name exit" bash -c "! [[ -d /proc/$pid ]]"; then
        log "$name (pid $pid) ignored SIGTERM for 20 s; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
    log "$name stopped (pid $pid)"
}

cmd_stop() {
    need_root
    stop_one "$SLURMD_PID" slurmd
    stop_one "$CTLD_PID" slurmctld
    stop_one "$MUNGE_PID" munged
}

cmd_status() {
    local rc=0
    for d in "$MUNGE_PID munged" "$CTLD_PID slurmctld" "$SLURMD_PID slurmd"; do
        set -- $d
        if pid_alive "$1" "$2"; then echo "$2: running (pid $(<"$1"))"; else echo "$2: stopped"; rc=3; fi
    done
    if [[ $rc -eq 0 ]]; then
        echo "node localhost: $(node_state)"
        squeue 2>/dev/null || true
    fi
    return $rc
}

case ${1:-} in
    install) cmd_install ;;
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    munge) need_root; start_munge ;;
    conf-policy) conf_policy ;;
    stop-munge)  # only when this cluster's daemons are not running (they need it)
        need_root
        if pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; then log "munged kept: the single-node cluster runs"
        else stop_one "$MUNGE_PID" munged; fi ;;
    *) echo "usage: $0 install|start|stop|status|munge|stop-munge|conf-policy" >&2; exit 2 ;;
esac
