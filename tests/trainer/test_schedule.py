"""WSD (linear / inverse-sqrt decay) and cosine schedules, per-group multipliers."""
from __future__ import annotations

import math

import pytest

from pretrain.schedule import LRSchedule


def test_wsd_phases_inv_sqrt_and_linear():
    s = LRSchedule(total_steps=100, peak_lr=1.0, warmup_frac=0.1, decay_frac=0.2, decay_shape="inv_sqrt")
    assert s.factor(1) == pytest.approx(0.1) and s.factor(10) == 1.0
    assert all(s.factor(k) == 1.0 for k in range(10, 81))  # stable
    assert s.factor(85) == pytest.approx(1 - math.sqrt(5 / 20))
    assert s.factor(100) == 0.0
    lin = LRSchedule(total_steps=100, peak_lr=1.0, warmup_frac=0.1, decay_frac=0.2, decay_shape="linear")
    assert lin.factor(90) == pytest.approx(0.5) and lin.factor(100) == 0.0
    # inverse-sqrt decays faster at first than linear
    assert s.factor(85) < lin.factor(85)
    floor = LRSchedule(total_steps=100, peak_lr=2.0, warmup_frac=0.0, decay_frac=0.5, min_lr_ratio=0.1)
    assert floor.lr(100) == pytest.approx(0.2) and floor.lr(1) == 2.0


def test_cosine():
    s = LRSchedule(total_steps=110, peak_lr=1.0, name="cosine", warmup_frac=10 / 110)
    assert s.factor(10) == pytest.approx(1.0)
    assert s.factor(60) == pytest.approx(0.5)
    assert s.factor(110) == pytest.approx(0.0, abs=1e-12)
    values = [s.factor(k) for k in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_group_multipliers_applied():
    s = LRSchedule(total_steps=10, peak_lr=0.5, warmup_frac=0.0, decay_frac=0.0)
    groups = [{"lr_mult": 2.63}, {"lr_mult": 0.88}, {}]
    base = s.apply(groups, 3, lr_mults=[9.0, 9.0, 0.5])
    assert base == 0.5
    assert [g["lr"] for g in groups] == pytest.approx([0.5 * 2.63, 0.5 * 0.88, 0.25])
    assert s.state_dict()["last_step"] == 3
