#!/usr/bin/env bash
# The launch wrapper that `srun` runs on every task: it maps SLURM's task variables to
# the ones torch.distributed / deepspeed.init_distributed read (DeepSpeed does not read
# SLURM's), then execs the given command, e.g.
#
#   srun cluster/launch.sh .venv/bin/python -m pretrain.train --config pretrain/configs/tiny.yaml
#
# The mapping itself (RANK, WORLD_SIZE, LOCAL_RANK as the task's GPU among those it sees,
# NODE_LOCAL_RANK, LOCAL_WORLD_SIZE, NODE_RANK, MASTER_ADDR from the step's node list,
# MASTER_PORT from the job id, OMP_NUM_THREADS, DS_ACCELERATOR=cpu without a GPU) is in
# parallel/slurm_env.py, the one place it is written: the trainer applies the same mapping
# when it is started by a bare `srun python -m pretrain.train`. That file needs only the
# standard library, so the node's system python3 runs it (HNET_LAUNCH_PYTHON overrides).
#
# Missing or inconsistent variables stop the task with exit status 2 and a message naming
# them; the step's --kill-on-bad-exit then ends the whole job.
set -euo pipefail

die() { echo "cluster/launch.sh: error: $*" >&2; exit 2; }

(( $# > 0 )) || die "no command given; usage: srun cluster/launch.sh COMMAND [ARGS...]"

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${HNET_LAUNCH_PYTHON:-$(command -v python3 || command -v python || true)}
[[ -n $py ]] || die "no python3 on PATH to map the SLURM variables (set HNET_LAUNCH_PYTHON)"
exports=$("$py" "$here/../parallel/slurm_env.py") || exit 2
eval "$exports"

if [[ $NODE_LOCAL_RANK == 0 ]]; then
    # One line per host: where its ranks run, under which name and address (what the others dial).
    addr=$(getent hosts "$(hostname)" 2>/dev/null | awk '{print $1; exit}')
    echo "cluster/launch.sh: host $(hostname) (${addr:-no address for its name}): node $NODE_RANK," \
         "$LOCAL_WORLD_SIZE of the $WORLD_SIZE ranks, the lowest $RANK" >&2
fi
if [[ $RANK == 0 ]]; then
    echo "cluster/launch.sh: job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $(hostname):" \
         "WORLD_SIZE=$WORLD_SIZE MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" \
         "DS_ACCELERATOR=${DS_ACCELERATOR:-auto}" >&2
fi
exec "$@"
