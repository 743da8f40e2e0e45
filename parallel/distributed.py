"""Process-group setup for every launcher: torchrun, deepspeed, srun, or one plain process.

torchrun and the deepspeed launcher set RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT. srun only sets SLURM_* variables, and `deepspeed.init_distributed()` does not read
them (it would fall back to mpi4py discovery), so they are mapped to torch's names first, by
`parallel.slurm_env` (the one mapping; cluster/launch.sh runs it too).
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from .slurm_env import LaunchError, slurm_port, slurm_to_torch  # noqa: F401  (slurm_port: public)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    launcher: str  # "torchrun" | "slurm" | "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def map_launcher_env(env: dict | None = None) -> dict[str, str]:
    """Returns the torch rendezvous variables for this process (does not modify `env`).

    Priority: variables set by torchrun / deepspeed; else SLURM's (srun task per rank), mapped by
    `parallel.slurm_env` (the same mapping cluster/launch.sh applies); else a single process on
    localhost with a free port.
    """
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:
        out = {k: env[k] for k in ("RANK", "WORLD_SIZE")}
        out["LOCAL_RANK"] = env.get("LOCAL_RANK", "0")
        out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
        out["MASTER_PORT"] = env.get("MASTER_PORT", "29500")
        out["_LAUNCHER"] = "torchrun"
        return out
    # Only inside an srun step (SLURM_STEP_ID set): the batch script of sbatch/salloc also sees
    # SLURM_PROCID=0 and SLURM_NTASKS=N, and a plain process there would wait for N-1 peers.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        try:
            return {**slurm_to_torch(env), "_LAUNCHER": "slurm"}
        except LaunchError as e:
            raise RuntimeError(f"cannot map this srun task's SLURM variables: {e}") from None
    return {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": env.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": env.get("MASTER_PORT") or str(free_port()), "_LAUNCHER": "single"}


def setup_env() -> DistInfo:
    """Exports the mapped variables into os.environ and returns this process's position."""
    mapped = map_launcher_env()
    launcher = mapped.pop("_LAUNCHER")
    os.environ.update(mapped)
    return DistInfo(int(mapped["RANK"]), int(mapped["WORLD_SIZE"]), int(mapped["LOCAL_RANK"]), launcher)


def init_process_group(info: DistInfo, use_deepspeed: bool = True, timeout_s: float = 1800) -> None:
    """Initialises torch.distributed (through DeepSpeed when it is used: it picks gloo on CPU)."""
    import datetime

    import torch.distributed as dist

    if dist.is_initialized():
        return
    if use_deepspeed:
        import deepspeed

        deepspeed.init_distributed(dist_init_required=True, timeout=datetime.timedelta(seconds=timeout_s))
    elif info.world_size > 1:
        import torch

        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=info.rank, world_size=info.world_size,
                                timeout=datetime.timedelta(seconds=timeout_s))


# ----------------------------------------------------------------------------- small collectives
def is_dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_dist():
        import torch.distributed as dist

        dist.barrier()


def _reduce(values: list[float], op_name: str) -> list[float]:
    """All-reduce a few floats (fp64, so byte counts stay exact). NCCL only reduces CUDA tensors,
    so the vector goes to this rank's GPU under NCCL and stays on the CPU under gloo."""
    if not is_dist():
        return list(values)
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op_name))
    return t.cpu().tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sums a few floats over all ranks."""
    return _reduce(values, "SUM")


def all_reduce_max(values: list[float]) -> list[float]:
    return _reduce(values, "MAX")


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def die_with_launcher(info: DistInfo, env: dict | None = None, poll_s: float = 1.0) -> bool:
    """Under torchrun or the deepspeed launcher, end this rank within about `poll_s` seconds of
    its launcher's death (SIGKILL to itself: an orphan must not checkpoint or log again). Their
    workers run in sessions of their own and would otherwise outlive a killed launcher.

    A watch of the parent PID rather than prctl(PR_SET_PDEATHSIG): that signal fires when the
    parent *thread* that forked us exits, which a launcher's worker threads may do at any time.
    Not under srun (slurmstepd ends a step's tasks itself) nor for a single process started by
    hand (its parent is a shell, which may go while the run should go on, as under nohup).
    Returns whether the watch runs."""
    import signal
    import threading
    import time

    env = os.environ if env is None else env
    if info.launcher != "torchrun" or "SLURM_STEP_ID" in env:
        return False
    parent = os.getppid()
    if parent == 1:
        return False  # already re-parented to init before we looked: nothing to watch

    def watch() -> None:
        while True:
            time.sleep(poll_s)
            if os.getppid() != parent:
                print(f"[train] rank {info.rank}: the launcher (pid {parent}) is gone; ending this rank", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()
    return True
