"""Learning-rate schedules: WSD (warmup, stable, decay with inverse-sqrt or linear shape) and cosine.

"inv_sqrt" is the WSD cool-down lr = peak * (1 - sqrt(t)) over the decay phase (t from 0 to 1),
not lr proportional to 1/sqrt(step).

The schedule gives a factor in [min_lr_ratio, 1] for optimizer step k (1-based); every parameter
group's lr is peak_lr * factor * lr_mult, where lr_mult is the group's per-stage multiplier
(eq. 11 of the H-Net paper). The schedule is a pure function of the step, so its saved state is
the step alone; it is still saved so a checkpoint says which schedule it was on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class LRSchedule:
    total_steps: int
    peak_lr: float
    name: str = "wsd"
    warmup_frac: float = 0.1
    decay_frac: float = 0.2
    decay_shape: str = "inv_sqrt"
    min_lr_ratio: float = 0.0
    last_step: int = 0

    @property
    def warmup_steps(self) -> int:
        return int(round(self.warmup_frac * self.total_steps))

    @property
    def decay_steps(self) -> int:
        return int(round(self.decay_frac * self.total_steps))

    def factor(self, step: int) -> float:
        """Multiplier of the peak lr at optimizer step `step` (1-based)."""
        warm = self.warmup_steps
        if warm > 0 and step <= warm:
            return step / warm
        floor = self.min_lr_ratio
        if self.name == "cosine":
            span = max(1, self.total_steps - warm)
            t = min(1.0, max(0.0, (step - warm) / span))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        decay = self.decay_steps
        start = self.total_steps - decay
        if decay <= 0 or step <= start:
            return 1.0
        t = min(1.0, (step - start) / decay)  # 0 at the start of the decay, 1 at the last step
        if self.decay_shape == "linear":
            shape = 1 - t
        else:
            # Inverse-sqrt cool-down reaching 0 at t = 1 (1 - sqrt(t)), as in WSD papers.
            shape = 1 - math.sqrt(t)
        return floor + (1 - floor) * shape

    def lr(self, step: int) -> float:
        return self.peak_lr * self.factor(step)

    def apply(self, param_groups: list[dict], step: int, lr_mults: list[float] | None = None) -> float:
        """Sets every group's lr for `step`; returns the base (multiplier 1) lr.

        `lr_mults` (one per group, same order) is used where a group lost its `lr_mult` key,
        which optimizer wrappers may drop.
        """
        base = self.lr(step)
        for i, group in enumerate(param_groups):
            mult = group.get("lr_mult")
            if mult is None:
                mult = lr_mults[i] if lr_mults is not None else 1.0
            group["lr"] = base * mult
        self.last_step = step
        return base

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state.get("last_step", 0))


def build_schedule(cfg, total_steps: int) -> LRSchedule:
    """From an `ExperimentConfig`."""
    s = cfg.schedule
    return LRSchedule(total_steps=total_steps, peak_lr=cfg.optim.lr, name=s.name, warmup_frac=s.warmup_frac,
                      decay_frac=s.decay_frac, decay_shape=s.decay_shape, min_lr_ratio=s.min_lr_ratio)
