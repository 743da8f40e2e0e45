"""SLURM task variables -> the variables torch.distributed and DeepSpeed read: the one mapping.

Used in two ways, so the rule lives only here:
- `cluster/launch.sh` (what `srun` runs on every task) executes this file, which prints shell
  `export` lines, and then execs the training command;
- `parallel.distributed.map_launcher_env` calls `slurm_to_torch` for a bare
  `srun python -m pretrain.train` without the wrapper.

Standard library only, and runnable as a plain file (`python3 parallel/slurm_env.py`): a
cluster node's system Python needs nothing of the project to map the variables.

    RANK             <- SLURM_PROCID            global rank of this task in the step
    WORLD_SIZE       <- SLURM_NTASKS            tasks in the step (srun sets it to the step's count)
    LOCAL_RANK       <- the index of this task's GPU among the devices it sees: SLURM_LOCALID when
                        the task sees the whole node's GPUs, 0 when SLURM bound one GPU to the task
                        (--gpus-per-task=1 and similar: CUDA_VISIBLE_DEVICES names a single device).
                        DeepSpeed calls torch.cuda.set_device(LOCAL_RANK), so a node-local id
                        with one visible device would be an "invalid device ordinal".
    NODE_LOCAL_RANK  <- SLURM_LOCALID           this task's index on its node, whatever the binding
    LOCAL_WORLD_SIZE <- this node's entry of SLURM_STEP_TASKS_PER_NODE ("2(x3),1" format)
    NODE_RANK        <- SLURM_NODEID
    MASTER_ADDR      <- first host of the step's node list (SLURM_STEP_NODELIST, else
                        SLURM_JOB_NODELIST: srun may run on a subset of the job's nodes)
    MASTER_PORT      <- 15000 + SLURM_JOB_ID % 15000: the same on every task without any exchange,
                        different for concurrent jobs, and below Linux's ephemeral range
                        (32768-60999) so no outgoing socket holds it. HNET_MASTER_PORT overrides it.
    OMP_NUM_THREADS  <- SLURM_CPUS_PER_TASK (one BLAS thread per CPU the task was given), unless set
    DS_ACCELERATOR   <- cpu when no NVIDIA GPU is visible, unless set

Missing or inconsistent variables raise `LaunchError` naming them (the wrapper exits 2 with
the message, and srun's --kill-on-bad-exit then ends the whole job).
"""
from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys

REQUIRED = ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_JOB_ID", "SLURM_JOB_NODELIST")
PORT_BASE, PORT_SPAN = 15000, 15000


class LaunchError(ValueError):
    """The SLURM task environment is missing a variable or contradicts itself."""


def slurm_port(job_id: str | int) -> int:
    """The rendezvous port of a job: derived from its id, so every task agrees without talking."""
    return PORT_BASE + int(job_id) % PORT_SPAN


def tasks_on_node(spec: str, node: int) -> int | None:
    """Entry `node` of SLURM's compressed tasks-per-node list ('2(x3),1' means 2,2,2,1); None when
    `node` is past its end. Raises LaunchError for a list it cannot read."""
    i = 0
    for item in spec.split(","):
        m = re.fullmatch(r"(\d+)\(x(\d+)\)", item)
        if m:
            count, reps = int(m.group(1)), int(m.group(2))
        elif item.isdigit():
            count, reps = int(item), 1
        else:
            raise LaunchError(f"cannot parse tasks per node '{spec}'")
        if node < i + reps:
            return count
        i += reps
    return None


def expand_first_host(nodelist: str) -> str:
    """The first host of a SLURM node list. `scontrol show hostnames` knows every syntax; without
    it (no slurm.conf on this machine) the forms 'host', 'a,b' and 'pre[003-005,9],...' still work."""
    if "[" in nodelist:
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.SubprocessError):
            pass  # scontrol retries for 60 s when it finds no configuration: hence the timeout
    m = re.match(r"([^\],\[]+)(\[(\d+))?", nodelist)
    if not m:
        raise LaunchError(f"cannot find the first host in the node list '{nodelist}'")
    return m.group(1) + (m.group(3) or "")


def visible_gpus(env: dict) -> list[str] | None:
    """The devices CUDA_VISIBLE_DEVICES names (None when unset: the task sees the whole node)."""
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return None
    return [d for d in value.split(",") if d.strip() not in ("", "-1", "NoDevFiles")]


def gpu_local_rank(node_local_rank: int, local_world: int, visible: list[str] | None) -> int:
    """Which of the devices a task sees is its own (see the module docstring)."""
    if visible is None or len(visible) >= local_world:
        return node_local_rank  # the task sees its node's devices: pick its own by node-local id
    return node_local_rank % len(visible) if visible else 0  # bound to its own device(s): the first


def _nonneg(env: dict, var: str, default: str | None = None) -> int:
    value = env.get(var, default)
    if value is None or not re.fullmatch(r"\d+", value):
        raise LaunchError(f"{var}='{value}' is not a non-negative integer")
    return int(value)


def has_nvidia_gpu(env: dict) -> bool:
    visible = visible_gpus(env)
    if visible is not None and not visible:
        return False
    return bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def slurm_to_torch(env: dict | None = None) -> dict[str, str]:
    """The torch variables for this SLURM task (see the module docstring); does not modify `env`."""
    env = dict(os.environ if env is None else env)
    for var in REQUIRED:
        if not env.get(var):
            raise LaunchError(f"{var} is not set; this must run as an srun task inside a SLURM job "
                              f"(srun cluster/launch.sh ...)")
    procid, ntasks = _nonneg(env, "SLURM_PROCID"), _nonneg(env, "SLURM_NTASKS")
    localid, job = _nonneg(env, "SLURM_LOCALID"), _nonneg(env, "SLURM_JOB_ID")
    node = _nonneg(env, "SLURM_NODEID", env.get("SLURM_NODEID", "0"))
    if ntasks < 1:
        raise LaunchError(f"SLURM_NTASKS={ntasks}: a step has at least one task")
    if procid >= ntasks:
        raise LaunchError(f"SLURM_PROCID={procid} is not below SLURM_NTASKS={ntasks} (ranks are 0..NTASKS-1)")
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE") or ""
    if spec:
        local_world = tasks_on_node(spec, node)
        if local_world is None:
            raise LaunchError(f"SLURM_NODEID={node} has no entry in tasks per node '{spec}'")
        if localid >= local_world:
            raise LaunchError(f"SLURM_LOCALID={localid} is not below the {local_world} tasks on node {node} ('{spec}')")
    else:  # without the per-node list, the only check left is against the step's size
        if localid >= ntasks:
            raise LaunchError(f"SLURM_LOCALID={localid} is not below SLURM_NTASKS={ntasks}")
        local_world = ntasks
    nodelist = env.get("SLURM_STEP_NODELIST") or env["SLURM_JOB_NODELIST"]
    port = env.get("HNET_MASTER_PORT") or str(slurm_port(job))
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise LaunchError(f"MASTER_PORT '{port}' is not a TCP port")
    out = {
        "RANK": str(procid), "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": str(gpu_local_rank(localid, local_world, visible_gpus(env))),
        "NODE_LOCAL_RANK": str(localid), "LOCAL_WORLD_SIZE": str(local_world), "NODE_RANK": str(node),
        "MASTER_ADDR": env.get("MASTER_ADDR") or expand_first_host(nodelist), "MASTER_PORT": port,
        "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS") or env.get("SLURM_CPUS_PER_TASK") or "1",
    }
    if not env.get("DS_ACCELERATOR") and not has_nvidia_gpu(env):
        out["DS_ACCELERATOR"] = "cpu"
    return out


def main() -> int:
    """Prints `export NAME=value` lines for cluster/launch.sh to eval; exit 2 with the reason."""
    try:
        mapped = slurm_to_torch()
    except LaunchError as e:
        print(f"cluster/launch.sh: error: {e}", file=sys.stderr)
        return 2
    for k, v in mapped.items():
        print(f"export {k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
