#!/usr/bin/env bash
# Install and start a single-node SLURM cluster (munge + slurmctld + slurmd) on
# this machine, for tests and CI. Needs root and Debian's apt registry.
# Safe to run repeatedly: a running cluster with unchanged config is left alone.
#
# No systemd is assumed: the daemons are started directly. Nothing cgroup-based
# is configured (proctrack/linuxproc, task/none, no cgroup.conf), because cgroups
# are often not writable inside containers.
set -euo pipefail

PARTITION=debug
SLURM_CONF=/etc/slurm/slurm.conf
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
CTLD_PID_FILE=/run/slurmctld.pid
SLURMD_PID_FILE=/run/slurmd.pid
NODE_READY_TIMEOUT_SECONDS=60
CONF_HEADER="# Written by .ci/slurm-setup.sh: single-node test cluster."

log() { echo "slurm-setup: $*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

[[ $(id -u) -eq 0 ]] || die "must run as root"

install_packages() {
    local wanted=(slurmctld slurmd slurm-client munge) missing=() pkg
    for pkg in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
            || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

start_munge() {
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating munge key"
        install -d -o munge -g munge -m 0700 /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    munge -n >/dev/null 2>&1 && return
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    munge -n | unmunge >/dev/null || die "munged started but credentials do not verify"
}

node_name() { hostname -s; }

# Hardware as slurmd sees it; only CPUs and memory go into the config so that
# CR_CPU_Memory can hand out single hyper-threads (a full topology would make
# SLURM allocate whole cores).
detect_hardware() {
    local detected
    detected=$(slurmd -C | head -n1)
    CPUS=$(grep -oP '\bCPUs=\K[0-9]+' <<<"$detected")
    REAL_MEMORY_MB=$(grep -oP '\bRealMemory=\K[0-9]+' <<<"$detected")
    [[ -n $CPUS && -n $REAL_MEMORY_MB ]] || die "cannot parse 'slurmd -C': $detected"
}

render_slurm_conf() {
    local node
    node=$(node_name)
    cat <<EOF
${CONF_HEADER}
ClusterName=ucpflow
SlurmctldHost=${node}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${CTLD_PID_FILE}
SlurmdPidFile=${SLURMD_PID_FILE}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
# Without a default, a job that names no memory would take the whole node.
DefMemPerCPU=1000
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
# Finished jobs stay visible to 'squeue --states=all' for this long; the
# Snakemake slurm executor relies on that since there is no sacct database.
MinJobAge=300
ReturnToService=2
InactiveLimit=0
KillWait=5
Waittime=0
NodeName=${node} NodeAddr=127.0.0.1 CPUs=${CPUS} RealMemory=${REAL_MEMORY_MB} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${node} Default=YES MaxTime=INFINITE State=UP
EOF
}

pid_file_alive() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_daemon() {
    local pid_file=$1 pid
    pid_file_alive "$pid_file" || return 0
    pid=$(cat "$pid_file")
    kill "$pid"
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.2
    done
    die "process $pid from $pid_file did not stop"
}

STARTED_A_DAEMON=false

start_daemons() {
    if ! pid_file_alive "$CTLD_PID_FILE"; then
        slurmctld || die "slurmctld failed to start; see ${LOG_DIR}/slurmctld.log"
        STARTED_A_DAEMON=true
    fi
    if ! pid_file_alive "$SLURMD_PID_FILE"; then
        slurmd -N "$(node_name)" || die "slurmd failed to start; see ${LOG_DIR}/slurmd.log"
        STARTED_A_DAEMON=true
    fi
}

# Empty while slurmctld is not answering yet.
node_state() { sinfo --noheader --nodes "$(node_name)" --format %t 2>/dev/null | head -n1 || true; }

wait_for_idle_node() {
    local deadline=$((SECONDS + NODE_READY_TIMEOUT_SECONDS)) state
    while ((SECONDS < deadline)); do
        # Restarts a daemon that was still shutting down when we first looked.
        start_daemons
        state=$(node_state)
        case $state in
            idle | mix | alloc | comp) return 0 ;;
            # A trailing '*' means slurmd has not registered yet: wait for it.
            *'*' | '' | unk) ;;
            drain | drng | down | fail | failg | inval)
                log "node is '$state', resuming it"
                scontrol update nodename="$(node_name)" state=resume || true
                ;;
        esac
        sleep 0.5
    done
    log "last node state: '${state}'; tail of logs:"
    tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
    die "node $(node_name) did not become idle within ${NODE_READY_TIMEOUT_SECONDS}s"
}

main() {
    install_packages
    start_munge
    detect_hardware

    local new_conf
    new_conf=$(render_slurm_conf)
    if [[ -f $SLURM_CONF ]] && [[ $(head -n1 "$SLURM_CONF") != "$CONF_HEADER" ]]; then
        die "$SLURM_CONF was not written by this script; refusing to replace a real cluster's config"
    fi
    if [[ ! -f $SLURM_CONF ]] || [[ $(cat "$SLURM_CONF") != "$new_conf" ]]; then
        # Node definitions cannot be changed by 'scontrol reconfigure'.
        stop_daemon "$SLURMD_PID_FILE"
        stop_daemon "$CTLD_PID_FILE"
        install -d -m 0755 "$(dirname "$SLURM_CONF")"
        printf '%s\n' "$new_conf" >"$SLURM_CONF"
    fi
    install -d -o slurm -g slurm -m 0755 "$STATE_DIR" "$LOG_DIR"
    install -d -o root -g root -m 0755 "$SPOOL_DIR"
    wait_for_idle_node
    local action="already running"
    [[ $STARTED_A_DAEMON == true ]] && action=started
    echo "SLURM cluster ${action}: node $(node_name) (${CPUS} CPUs, ${REAL_MEMORY_MB} MB), partition ${PARTITION}, state $(node_state)"
}

main "$@"
