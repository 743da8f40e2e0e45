"""Fault injection for the tests of the trainer's guards (`debug.*` in the config; all off by default).

The loop calls one `FaultInjector` at named points, so the loop itself reads as training:

    step_start(step)          debug.raise_at_step: rank debug.crash_rank raises
    poisons_loss(step)        debug.nan_at_steps: this step's loss is made NaN (the NaN guard)
    save_hook(step)(phase)    debug.crash_in_save_at_step: rank crash_rank dies mid-save
                              (phase "after_engine_save": its shard files are written, `latest` is not)
    after_checkpoint(step)    debug.hang_at_step: sleep forever after this step's checkpoint
                              (the SIGKILL tests kill the processes then)
"""
from __future__ import annotations

import os
import time


class FaultInjector:
    def __init__(self, debug, rank: int, log=print):
        self.debug, self.rank, self.log = debug, rank, log

    @property
    def _chosen(self) -> bool:
        return self.rank == self.debug.crash_rank

    def step_start(self, step: int) -> None:
        if self.debug.raise_at_step == step and self._chosen:
            raise RuntimeError(f"debug.raise_at_step: rank {self.rank} fails at step {step}")

    def poisons_loss(self, step: int) -> bool:
        return step in self.debug.nan_at_steps

    def save_hook(self, step: int):
        """The crash hook for the checkpoint manager's save of `step` (None when nothing is injected)."""
        if self.debug.crash_in_save_at_step != step or not self._chosen:
            return None

        def crash(phase: str) -> None:
            if phase == "after_engine_save":
                print(f"[train] debug: rank {self.rank} dies in the middle of saving step {step}", flush=True)
                os._exit(17)

        return crash

    def after_checkpoint(self, step: int, flush_tracking) -> None:
        if self.debug.hang_at_step != step:
            return
        flush_tracking()
        self.log(f"debug: hanging after step {step} (waiting to be killed)")
        while True:
            time.sleep(1)
