#!/usr/bin/env bash
# A multi-host SLURM cluster on one Debian machine: 2-3 compute hosts, each in its own network
# namespace (its own address, ports and routing) and UTS namespace (its own hostname), joined by a
# bridge. slurmctld and munged run on the machine itself ("the host side"); one slurmd per
# compute host registers under its own node name. Jobs run across these hosts for real: srun
# fans out over the bridge, and the ranks rendezvous over the hosts' addresses, exactly as on a
# cluster whose nodes share a file system (here: the machine's).
#
#   cluster/local_slurm_hosts.sh start [N]        N compute hosts hnet1..hnetN (default 3, at most 9)
#   cluster/local_slurm_hosts.sh stop             every daemon, namespace, link and file it created
#   cluster/local_slurm_hosts.sh status           daemons, nodes, queue
#   cluster/local_slurm_hosts.sh env              the export line that points sbatch/squeue here
#   cluster/local_slurm_hosts.sh kill-host NAME   SIGKILL every process in NAME's namespace (a host dying)
#   cluster/local_slurm_hosts.sh revive-host NAME start NAME's slurmd again (the host is back)
#
# It is its own cluster ("hnethosts": its own slurm.conf, controller port, state and logs), so it
# runs beside cluster/local_slurm.sh's single-node one. Commands reach it through SLURM_CONF:
#   eval "$(cluster/local_slurm_hosts.sh env)"; sbatch --nodes=2 --ntasks-per-node=2 ...
#
# Addresses: HNET_HOSTS_NET.1 is the controller's (on the bridge, host side), .11, .12, ... the
# compute hosts'; the default 10.213.7.0/24 exists only on the bridge and in the namespaces.
# Names: every host gets /etc/netns/<ns>/hosts (and a resolv.conf without a reachable name
# server), mounted over /etc/hosts for its slurmd and so for every process of every job on it.
#
# Everything created is written to $STATE_FILE as it is created; `stop` removes exactly those
# things (daemons by their recorded PIDs, processes by the namespaces recorded, links and
# namespaces by name), never by a broad pattern.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CONF_DIR=/etc/slurm-hnet-hosts
SLURM_CONF_FILE=$CONF_DIR/slurm.conf
RUN_DIR=/run/hnet-hosts
STATE_FILE=$RUN_DIR/created
SPOOL=/var/spool/hnet-hosts
LOG_DIR=/var/log/hnet-hosts
JOBCOMP_LOG=$LOG_DIR/jobcomp.log
CTLD_PID=$RUN_DIR/slurmctld.pid
CTLD_PORT=${HNET_HOSTS_CTLD_PORT:-6827}
NET=${HNET_HOSTS_NET:-10.213.7}
BRIDGE=hnetbr0
CONF_MARK="# written by hnet-pretrain cluster/local_slurm_hosts.sh"
START_TIMEOUT_S=${LOCAL_SLURM_START_TIMEOUT_S:-60}
# A node whose slurmd stops answering is DOWN after this many seconds (and a job it ran is
# ended): short here so the host-death test takes one minute, not the default five.
SLURMD_TIMEOUT_S=${HNET_HOSTS_SLURMD_TIMEOUT_S:-12}

die() { echo "local_slurm_hosts: $*" >&2; exit 1; }
log() { echo "local_slurm_hosts: $*"; }
need_root() { [[ $(id -u) -eq 0 ]] || die "must run as root (it creates network namespaces and starts daemons)"; }

node_name() { echo "hnet$1"; }              # host i -> its node name and hostname
ns_name() { echo "hnet-ns$1"; }             # its network namespace
veth_name() { echo "hnetv$1"; }             # the host-side end of its link to the bridge
node_addr() { echo "$NET.$((10 + $1))"; }   # its address
ctl_host() { hostname -s; }

record() { mkdir -p "$RUN_DIR"; echo "$*" >>"$STATE_FILE"; }
recorded() { [[ -s $STATE_FILE ]] && grep -qxF "$*" "$STATE_FILE"; }

pid_alive() {  # pid_alive PIDFILE NAME: the recorded pid runs a process called NAME
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ && -r /proc/$pid/comm ]] || return 1
    [[ $(</proc/$pid/comm) == "$name" ]]
}

wait_for() {  # wait_for SECONDS COMMAND...
    local deadline=$((SECONDS + $1)); shift
    until "$@"; do (( SECONDS < deadline )) || return 1; sleep 0.2; done
}

hosts_configured() { sed -n 's/^# hosts: \([0-9]*\)$/\1/p' "$SLURM_CONF_FILE" 2>/dev/null; }

write_conf() {  # write_conf N: returns 1 when the file was already up to date
    local n=$1 i
    if [[ -e $SLURM_CONF_FILE ]] && ! grep -qF "$CONF_MARK" "$SLURM_CONF_FILE"; then
        die "$SLURM_CONF_FILE exists and was not written by this script; refusing to overwrite it"
    fi
    local cpus; cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
    mkdir -p "$CONF_DIR"
    local tmp="$SLURM_CONF_FILE.tmp.$$"
    {
        cat <<EOF
$CONF_MARK
# hosts: $n
# $n compute hosts, each a network + UTS namespace on this machine with all $cpus CPUs
# (they share them), one partition "hosts". The controller listens on the bridge.
ClusterName=hnethosts
SlurmctldHost=$(ctl_host)($NET.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=6818
$("$HERE/local_slurm.sh" conf-policy)
SlurmdTimeout=$SLURMD_TIMEOUT_S
StateSaveLocation=$SPOOL/ctld
# %n: every slurmd has its own spool directory, pid file and log.
SlurmdSpoolDir=$SPOOL/%n
SlurmdPidFile=$RUN_DIR/slurmd-%n.pid
SlurmdLogFile=$LOG_DIR/slurmd-%n.log
SlurmctldPidFile=$CTLD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
JobCompLoc=$JOBCOMP_LOG
EOF
        for ((i = 1; i <= n; i++)); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=$cpus State=UNKNOWN"
        done
        echo "PartitionName=hosts Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$tmp"
    if cmp -s "$tmp" "$SLURM_CONF_FILE"; then rm -f "$tmp"; return 1; fi
    mv "$tmp" "$SLURM_CONF_FILE"
}

check_net_free() {
    # The range must not be in use on this machine, except by this script's own bridge.
    local used
    used=$(ip -o -4 addr show | awk -v net="$NET." -v br="$BRIDGE" '$2 != br && index($4, net) == 1 {print $2}')
    [[ -z $used ]] || die "$NET.0/24 is already used by interface(s) $used: set HNET_HOSTS_NET to a free private /24 prefix"
}

make_bridge() {
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        recorded "link $BRIDGE" || die "a bridge $BRIDGE exists that this script did not create"
        return
    fi
    check_net_free
    ip link add "$BRIDGE" type bridge
    record "link $BRIDGE"
    ip addr add "$NET.1/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
}

hosts_file() {  # hosts_file N: what every host's /etc/hosts says
    local n=$1 i
    echo "127.0.0.1 localhost"
    echo "$NET.1 $(ctl_host)"
    for ((i = 1; i <= n; i++)); do echo "$(node_addr "$i") $(node_name "$i")"; done
}

make_host() {  # make_host I N
    local i=$1 n=$2 ns veth
    ns=$(ns_name "$i"); veth=$(veth_name "$i")
    if ! ip netns list | grep -qw "^$ns"; then
        ip netns add "$ns"
        record "netns $ns"
    fi
    mkdir -p "/etc/netns/$ns"
    recorded "etc /etc/netns/$ns" || record "etc /etc/netns/$ns"
    hosts_file "$n" >"/etc/netns/$ns/hosts"
    # No name server is reachable from a host (the bridge does not route out): one on the host's
    # own loopback refuses at once, where the machine's would time out every reverse lookup
    # (c10d looks up each peer that connects to its store: 10 s per lookup at the defaults).
    printf 'nameserver 127.0.0.1\noptions timeout:1 attempts:1\n' >"/etc/netns/$ns/resolv.conf"
    if ! ip link show "$veth" >/dev/null 2>&1; then
        ip link add "$veth" type veth peer name eth0 netns "$ns"
        record "link $veth"
        ip link set "$veth" master "$BRIDGE" up
        ip netns exec "$ns" ip addr add "$(node_addr "$i")/24" dev eth0
        ip netns exec "$ns" ip link set eth0 up
        ip netns exec "$ns" ip link set lo up
        ip netns exec "$ns" ip route add default via "$NET.1"
    fi
}

slurmd_pidfile() { echo "$RUN_DIR/slurmd-$(node_name "$1").pid"; }

start_slurmd() {  # start_slurmd I: slurmd inside host I's namespaces, under its own hostname
    local i=$1 name ns
    name=$(node_name "$i"); ns=$(ns_name "$i")
    if pid_alive "$(slurmd_pidfile "$i")" slurmd; then log "slurmd on $name already running"; return; fi
    install -d -m 0755 "$SPOOL/$name"
    # The host's network namespace; a UTS namespace for its hostname; a mount namespace in which
    # its hosts file is /etc/hosts. (Not `ip netns exec`: it remounts /sys, and slurmd needs the
    # machine's /sys/fs/cgroup.) slurmd daemonizes and keeps all three, and so do its job steps.
    nsenter --net="/run/netns/$ns" -- unshare --uts --mount --propagation private -- \
        sh -c "mount --bind /etc/netns/$ns/hosts /etc/hosts && { [ ! -e /etc/resolv.conf ] || mount --bind /etc/netns/$ns/resolv.conf /etc/resolv.conf; } && hostname $name && exec /usr/sbin/slurmd -f $SLURM_CONF_FILE -N $name"
    wait_for 10 pid_alive "$(slurmd_pidfile "$i")" slurmd || die "slurmd on $name did not start (see $LOG_DIR/slurmd-$name.log)"
    log "slurmd on $name ($(node_addr "$i"), namespace $ns) started (pid $(<"$(slurmd_pidfile "$i")"))"
}

export_conf() { export SLURM_CONF=$SLURM_CONF_FILE; }

node_state() { scontrol show node "$1" 2>/dev/null | sed -n 's/.*State=\([A-Z+_*]*\).*/\1/p' | head -1; }
all_nodes_up() {
    local n=$1 i s
    for ((i = 1; i <= n; i++)); do
        s=$(node_state "$(node_name "$i")")
        [[ $s == IDLE* || $s == MIXED* || $s == ALLOCATED* ]] || return 1
    done
}

cmd_start() {
    need_root
    local n=${1:-3}
    [[ $n =~ ^[1-9]$ ]] || die "the number of hosts must be 1..9, not '$n'"
    "$HERE/local_slurm.sh" install >/dev/null
    local munge_out; munge_out=$("$HERE/local_slurm.sh" munge); echo "$munge_out"
    if [[ $munge_out == *"munged started"* ]]; then record "munged started"; fi
    export_conf
    local t0=$SECONDS old; old=$(hosts_configured || true)
    if [[ -n $old && $old != "$n" ]] && { pid_alive "$CTLD_PID" slurmctld || [[ -s $STATE_FILE ]]; }; then
        log "running with $old hosts, $n asked: stopping first"
        cmd_stop
    fi
    local changed=0
    if write_conf "$n"; then changed=1; fi
    install -d -o slurm -g slurm -m 0755 "$RUN_DIR" "$SPOOL/ctld" "$LOG_DIR"
    install -d -m 0755 "$SPOOL"
    make_bridge
    local i
    for ((i = 1; i <= n; i++)); do make_host "$i" "$n"; done
    if (( changed )) && pid_alive "$CTLD_PID" slurmctld; then stop_daemons "$n"; fi
    if pid_alive "$CTLD_PID" slurmctld; then
        log "slurmctld already running (pid $(<"$CTLD_PID"))"
    else
        /usr/sbin/slurmctld -f "$SLURM_CONF_FILE"
        wait_for 20 scontrol ping >/dev/null 2>&1 || die "slurmctld does not answer (see $LOG_DIR/slurmctld.log)"
        log "slurmctld started on $NET.1:$CTLD_PORT (pid $(<"$CTLD_PID"))"
    fi
    for ((i = 1; i <= n; i++)); do start_slurmd "$i"; done
    if ! wait_for 15 all_nodes_up "$n"; then
        # Nodes left DOWN by an earlier host death or unclean stop: put them back in service.
        scontrol update nodename="$(node_name 1)-$n" state=resume >/dev/null 2>&1 || \
            for ((i = 1; i <= n; i++)); do scontrol update nodename="$(node_name "$i")" state=resume >/dev/null 2>&1 || true; done
    fi
    wait_for "$START_TIMEOUT_S" all_nodes_up "$n" || die "not every node is up after ${START_TIMEOUT_S}s: $(sinfo -h -N -o '%N=%T' | tr '\n' ' ') (see $LOG_DIR/)"
    log "$n hosts up: $(sinfo -h -N -o '%N(%T)' | tr '\n' ' ')in $((SECONDS - t0)) s; use: eval \"\$($0 env)\""
}

stop_pid() {  # stop_pid PIDFILE NAME
    local pidfile=$1 name=$2 pid
    pid_alive "$pidfile" "$name" || { rm -f "$pidfile"; return 0; }
    pid=$(<"$pidfile")
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_for 20 bash -c "! [[ -d /proc/$pid ]]"; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -f "$pidfile"
    log "$name stopped (pid $pid)"
}

stop_daemons() {  # slurmds first, then the controller; namespaces stay
    local n=$1 i
    for ((i = 1; i <= n; i++)); do stop_pid "$(slurmd_pidfile "$i")" slurmd; done
    stop_pid "$CTLD_PID" slurmctld
}

kill_namespace_processes() {  # every process still in a recorded namespace (job steps, ranks)
    local ns=$1 pids
    ip netns list | grep -qw "^$ns" || return 0
    pids=$(ip netns pids "$ns" 2>/dev/null || true)
    [[ -z $pids ]] || kill -KILL $pids 2>/dev/null || true
}

cmd_stop() {
    need_root
    local n; n=$(hosts_configured || true)
    stop_daemons "${n:-0}"
    [[ -s $STATE_FILE ]] || { log "nothing else recorded in $STATE_FILE"; return 0; }
    local kind what
    while read -r kind what; do [[ $kind == netns ]] && kill_namespace_processes "$what"; done <"$STATE_FILE"
    # Reverse order of creation: links before the namespaces they lead into, the bridge last.
    tac "$STATE_FILE" | while read -r kind what; do
        case $kind in
            link) ip link del "$what" 2>/dev/null || true ;;
            netns) ip netns del "$what" 2>/dev/null || true ;;
            etc) rm -rf -- "$what" ;;
        esac
    done
    if grep -qxF "munged started" "$STATE_FILE"; then "$HERE/local_slurm.sh" stop-munge; fi
    rm -f "$STATE_FILE"
    log "removed every namespace, link and daemon it created"
}

host_index() {  # host_index NAME -> I, for a configured host
    local n i; n=$(hosts_configured || true)
    for ((i = 1; i <= ${n:-0}; i++)); do [[ $(node_name "$i") == "$1" ]] && { echo "$i"; return; }; done
    die "no host '$1' in this cluster (hosts: $(sinfo -h -N -o '%N' 2>/dev/null | tr '\n' ' '))"
}

cmd_kill_host() {
    need_root
    local i; i=$(host_index "${1:?usage: kill-host NAME}")
    local ns; ns=$(ns_name "$i")
    local pids; pids=$(ip netns pids "$ns" | tr '\n' ' ')
    kill_namespace_processes "$ns"
    rm -f "$(slurmd_pidfile "$i")"
    log "host $1 died: killed every process in namespace $ns ($pids)"
}

cmd_revive_host() {
    need_root; export_conf
    local i; i=$(host_index "${1:?usage: revive-host NAME}")
    start_slurmd "$i"
    scontrol update nodename="$1" state=resume >/dev/null 2>&1 || true
}

cmd_status() {
    local n i rc=0; n=$(hosts_configured || true)
    export_conf
    if pid_alive "$CTLD_PID" slurmctld; then echo "slurmctld: running (pid $(<"$CTLD_PID"))"; else echo "slurmctld: stopped"; rc=3; fi
    for ((i = 1; i <= ${n:-0}; i++)); do
        if pid_alive "$(slurmd_pidfile "$i")" slurmd; then
            echo "slurmd $(node_name "$i") ($(node_addr "$i")): running (pid $(<"$(slurmd_pidfile "$i")"))"
        else echo "slurmd $(node_name "$i"): stopped"; rc=3; fi
    done
    if (( rc == 0 )); then sinfo -N; squeue 2>/dev/null || true; fi
    return $rc
}

case ${1:-} in
    start) cmd_start "${2:-3}" ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$SLURM_CONF_FILE" ;;
    kill-host) cmd_kill_host "${2:-}" ;;
    revive-host) cmd_revive_host "${2:-}" ;;
    *) echo "usage: $0 start [N]|stop|status|env|kill-host NAME|revive-host NAME" >&2; exit 2 ;;
esac
