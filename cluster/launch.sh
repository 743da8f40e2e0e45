#!/usr/bin/env bash
# The launch wrapper that `srun` runs on every task: it maps SLURM's task variables to
# the ones torch.distributed / deepspeed.init_distributed read (DeepSpeed does not read
# SLURM's), then execs the given command, e.g.
#
#   srun cluster/launch.sh .venv/bin/python -m pretrain.train --config pretrain/configs/tiny.yaml
#
#   RANK             <- SLURM_PROCID          global rank of this task in the step
#   WORLD_SIZE       <- SLURM_NTASKS          tasks in the step (srun sets it to the step's count)
#   LOCAL_RANK       <- SLURM_LOCALID         rank on this node (selects the GPU)
#   LOCAL_WORLD_SIZE <- this node's entry of SLURM_STEP_TASKS_PER_NODE ("2(x3),1" format)
#   NODE_RANK        <- SLURM_NODEID
#   MASTER_ADDR      <- first host of the step's node list (SLURM_STEP_NODELIST, else
#                       SLURM_JOB_NODELIST: srun may run on a subset of the job's nodes)
#   MASTER_PORT      <- 15000 + SLURM_JOB_ID % 15000: the same on every task without any
#                       exchange, different for concurrent jobs, and below Linux's
#                       ephemeral range (32768-60999) so no outgoing socket holds it.
#                       HNET_MASTER_PORT overrides it.
#
# Missing or inconsistent variables stop the task with exit status 2 and a message naming
# them; the step's --kill-on-bad-exit then ends the whole job.
# Without a visible NVIDIA GPU it sets DS_ACCELERATOR=cpu (unless already set), so DeepSpeed
# uses its CPU accelerator and gloo.
set -euo pipefail

die() { echo "cluster/launch.sh: error: $*" >&2; exit 2; }

(( $# > 0 )) || die "no command given; usage: srun cluster/launch.sh COMMAND [ARGS...]"

for var in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_JOB_ID SLURM_JOB_NODELIST; do
    [[ -n ${!var:-} ]] || die "$var is not set; this wrapper must run as an srun task inside a SLURM job (srun cluster/launch.sh ...)"
done
for var in SLURM_PROCID SLURM_NTASKS SLURM_LOCALID SLURM_JOB_ID; do
    [[ ${!var} =~ ^[0-9]+$ ]] || die "$var='${!var}' is not a non-negative integer"
done
node_id=${SLURM_NODEID:-0}
[[ $node_id =~ ^[0-9]+$ ]] || die "SLURM_NODEID='$node_id' is not a non-negative integer"

(( SLURM_NTASKS >= 1 )) || die "SLURM_NTASKS=$SLURM_NTASKS: a step has at least one task"
(( SLURM_PROCID < SLURM_NTASKS )) \
    || die "SLURM_PROCID=$SLURM_PROCID is not below SLURM_NTASKS=$SLURM_NTASKS (ranks are 0..NTASKS-1)"

# tasks_on_node SPEC INDEX: expand SLURM's compressed tasks-per-node list ("2(x3),1"
# means 2,2,2,1) and print the entry of node INDEX; nothing when INDEX is out of range.
tasks_on_node() {
    local spec=$1 want=$2 item count reps i=0
    local IFS=,
    for item in $spec; do
        if [[ $item =~ ^([0-9]+)\(x([0-9]+)\)$ ]]; then
            count=${BASH_REMATCH[1]}; reps=${BASH_REMATCH[2]}
        elif [[ $item =~ ^[0-9]+$ ]]; then
            count=$item; reps=1
        else
            return 1
        fi
        if (( want < i + reps )); then echo "$count"; return 0; fi
        i=$((i + reps))
    done
}

local_world=""
spec=${SLURM_STEP_TASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-}}
if [[ -n $spec ]]; then
    local_world=$(tasks_on_node "$spec" "$node_id") \
        || die "cannot parse tasks per node '$spec'"
    [[ -n $local_world ]] || die "SLURM_NODEID=$node_id has no entry in tasks per node '$spec'"
    (( SLURM_LOCALID < local_world )) \
        || die "SLURM_LOCALID=$SLURM_LOCALID is not below the $local_world tasks on node $node_id ('$spec')"
else
    # Without the per-node list, the only check left is against the step's size.
    (( SLURM_LOCALID < SLURM_NTASKS )) \
        || die "SLURM_LOCALID=$SLURM_LOCALID is not below SLURM_NTASKS=$SLURM_NTASKS"
fi

# The first host of the node list. scontrol knows every nodelist syntax; without it
# (no slurm.conf) the common forms "host", "host,host" and "pre[003-005,9],..." still work.
# (scontrol retries for 60 s when it finds no configuration, hence the timeout.)
nodelist=${SLURM_STEP_NODELIST:-$SLURM_JOB_NODELIST}
first_host=""
if [[ $nodelist == *[* ]] && command -v scontrol >/dev/null 2>&1; then
    first_host=$(timeout 10 scontrol show hostnames "$nodelist" 2>/dev/null | head -n 1) || first_host=""
fi
if [[ -z $first_host ]]; then
    if [[ $nodelist =~ ^([^],[]+)(\[([0-9]+))? ]]; then
        first_host=${BASH_REMATCH[1]}${BASH_REMATCH[3]}
    fi
fi
[[ -n $first_host ]] || die "cannot find the first host in the node list '$nodelist'"

port=${HNET_MASTER_PORT:-$((15000 + SLURM_JOB_ID % 15000))}
[[ $port =~ ^[0-9]+$ ]] && (( port > 0 && port < 65536 )) || die "MASTER_PORT '$port' is not a TCP port"

export RANK=$SLURM_PROCID
export WORLD_SIZE=$SLURM_NTASKS
export LOCAL_RANK=$SLURM_LOCALID
export LOCAL_WORLD_SIZE=${local_world:-$SLURM_NTASKS}
export NODE_RANK=$node_id
export MASTER_ADDR=$first_host
export MASTER_PORT=$port
# One BLAS thread per CPU the task was given, not one per core of the node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

has_nvidia_gpu() {
    case ${CUDA_VISIBLE_DEVICES-unset} in ""|-1|NoDevFiles) return 1 ;; esac
    compgen -G "/proc/driver/nvidia/gpus/*" >/dev/null
}
if [[ -z ${DS_ACCELERATOR:-} ]] && ! has_nvidia_gpu; then
    export DS_ACCELERATOR=cpu
fi

if [[ $RANK == 0 ]]; then
    echo "cluster/launch.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: WORLD_SIZE=$WORLD_SIZE" \
         "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT DS_ACCELERATOR=${DS_ACCELERATOR:-auto}" >&2
fi
exec "$@"
