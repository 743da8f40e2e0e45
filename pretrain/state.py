"""The small pieces of resumable state that are not owned by another component.

Everything that decides what a run does next is an object with `state_dict()` /
`load_state_dict()`, registered once with the `CheckpointManager`, which saves all of them in
every checkpoint and restores all of them on resume (see pretrain/checkpoint.py). The data
loader, the learning-rate schedule and the executor's engines are such objects already; the
counters of the loop, the random generators and the MLflow run id live here.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import numpy as np
import torch

from parallel.build import seed_everything
from parallel.distributed import all_gather_object


@dataclass
class TrainState:
    """The loop's counters: optimizer steps done, real bytes trained on, the current run of
    consecutive non-finite steps (saved, so a requeue cannot reset the train.max_bad_steps guard),
    and whether the final evaluation is still to do."""

    step: int = 0
    bytes_seen: int = 0
    bad_steps_in_a_row: int = 0
    eval_pending: bool = False  # a signal at the final step came before its evaluation: the next launch does it

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.bytes_seen = int(state["bytes_seen"])
        self.bad_steps_in_a_row = int(state.get("bad_steps_in_a_row", 0))
        self.eval_pending = bool(state.get("eval_pending", False))


@dataclass
class TrackingState:
    """The MLflow run this training run logs to: a resumed run continues the same one."""

    run_id: str | None = None

    def state_dict(self) -> dict:
        return {"run_id": self.run_id}

    def load_state_dict(self, state: dict) -> None:
        self.run_id = state.get("run_id")


class RNGState:
    """This process's Python, NumPy, torch and CUDA generators. The state differs per rank, so it
    is saved for every rank (`per_rank=True` at registration); at another world size the ranks
    no longer match the saved ones and every rank is reseeded from the run seed, the step and its
    rank instead (`reseed`).

    Of CUDA, only this rank's device: a rank computes on one GPU, and the generators of the
    others it can see depend on the launch (torchrun shows a task the node's eight GPUs, `srun
    --gpus-per-task=1` one), so a resume under another binding must not restore eight states
    into one device (an invalid ordinal) or another device's state into this one."""

    def __init__(self, seed: int, rank: int, train_state: TrainState, cuda=torch.cuda):
        self.seed, self.rank, self.train_state = seed, rank, train_state
        self.cuda = cuda  # torch.cuda; its generators are per device

    def state_dict(self) -> dict:
        cuda = self.cuda.get_rng_state(self.cuda.current_device()) if self.cuda.is_available() else None
        return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
                "cuda": cuda}

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        np.random.set_state(state["numpy"])
        torch.set_rng_state(state["torch"])
        saved = state.get("cuda")
        if saved is None or not self.cuda.is_available():
            return
        device = self.cuda.current_device()
        if isinstance(saved, (list, tuple)):  # checkpoints before this format: every visible device's
            if len(saved) != self.cuda.device_count():  # another binding: which entry was this rank's?
                self.reseed_cuda()
                return
            saved = saved[device]
        self.cuda.set_rng_state(saved, device)

    def _fallback_seed(self) -> int:
        return self.seed + 1000003 * self.train_state.step + self.rank

    def reseed(self) -> None:
        seed_everything(self._fallback_seed())

    def reseed_cuda(self) -> None:
        self.cuda.manual_seed(self._fallback_seed())


class PerRank:
    """Saves a rank-dependent state for every rank ({rank: state}, gathered: DeepSpeed's universal
    and ZeRO-1/2 loads hand every rank rank 0's client state); on load each rank takes its own
    entry, or calls the object's `reseed()` when the world size changed since the save."""

    def __init__(self, inner, rank: int, world_size: int):
        self.inner, self.rank, self.world_size = inner, rank, world_size

    def state_dict(self) -> dict:
        return {"world_size": self.world_size, "ranks": dict(enumerate(all_gather_object(self.inner.state_dict())))}

    def load_state_dict(self, state: dict) -> None:
        ranks = state["ranks"]
        if state["world_size"] == self.world_size and self.rank in ranks:
            self.inner.load_state_dict(ranks[self.rank])
        else:
            self.inner.reseed()
