"""Load balancing: equal micro-batch counts, near-equal cost per rank on heavy-tailed lengths."""
from __future__ import annotations

import numpy as np

from data_pipeline.balance import imbalance, partition_lpt, plan_step, round_robin_costs
from data_pipeline.packer import Piece
from pretrain.model.flops import DocCostModel
from pretrain.model.flops import attention_pairs as pairs


def test_cost_model_terms():
    assert pairs(4, None) == 10 and pairs(4, -1) == 10 and pairs(0, None) == 0
    assert pairs(10, 3) == 10 + 6 * 4  # window 3: a query sees itself and 3 keys before it
    assert pairs(4, 3) == pairs(4, None)
    cm = DocCostModel(2.0, [(0.5, 4.0, None), (1.0, 2.0, 7)])
    assert cm(16) == 2 * 16 + 0.5 * pairs(4, None) + 1.0 * pairs(8, 7)
    cm.update_ratios([8.0, 4.0])  # measured compression from the trainer
    assert cm(16) == 2 * 16 + 0.5 * pairs(2, None) + 1.0 * pairs(4, 7)
    cm2 = DocCostModel()
    cm2.load_state_dict(cm.state_dict())
    assert cm2(1000) == cm(1000)


def test_lognormal_heavy_tail_balanced_within_5_percent():
    rng = np.random.default_rng(0)
    R, M, C = 8, 4, 8192
    # attention is ~40% of a full row's cost: long documents cost more per byte than short ones
    cm = DocCostModel(1.0, [(0.0017, 4.0, None)])
    carry, worst, rr_mean, eff, lpt_mean = [], 0.0, [], [], []
    key = 0
    for _step in range(60):
        window = list(carry)
        have = sum(p.length for p in window)
        while have < 1.25 * R * M * C:
            n = int(min(rng.lognormal(7.0, 1.5), 200_000)) + 1
            window.append(Piece(f"s:{key}", bytes(n)))
            key += 1
            have += n + 1
        plan = plan_step(window, len(carry), R, M, C, cm)
        part = plan.part
        assert len(part.bins) == R * M and all(len(part.rank_bins(r)) == M for r in range(R))
        assert all(sum(plan.sizes[i] for i in b) <= C for b in part.bins)
        placed = sorted(i for b in part.bins for i in b)
        assert len(set(placed)) == len(placed) and not set(placed) & set(part.unplaced)
        carry = [plan.window[i] for i in part.unplaced]
        imb = imbalance(part.rank_cost)
        worst = max(worst, imb)
        lpt_mean.append(imb)
        rr_mean.append(imbalance(round_robin_costs([plan.costs[i] for i in placed], R)))
        eff.append(sum(part.rank_bytes) / (R * M * C))
    print(f"\nlog-normal, 8 ranks x 4 micro-batches of 8192: imbalance LPT worst {worst:.4f} "
          f"mean {np.mean(lpt_mean):.4f}; round-robin mean {np.mean(rr_mean):.4f} worst {max(rr_mean):.4f}; "
          f"packing efficiency mean {np.mean(eff):.4f}")
    assert worst <= 1.05
    assert np.mean(rr_mean) > np.mean(lpt_mean) + 0.05  # the baseline really is worse
    assert np.mean(eff) >= 0.98


def test_partition_is_deterministic_and_respects_priority():
    sizes = [100, 90, 80, 70, 60, 50, 40, 30, 20, 10] * 3
    costs = [float(s * s) for s in sizes]
    a = partition_lpt(sizes, costs, 3, 2, 200, n_priority=2)
    b = partition_lpt(sizes, costs, 3, 2, 200, n_priority=2)
    assert a.bins == b.bins and a.unplaced == b.unplaced
    assert 0 not in a.unplaced and 1 not in a.unplaced  # carried items are placed first


def test_cost_model_agrees_with_the_model_flops():
    """DocCostModel(*document_cost_terms(config)) gives the model's own FLOP estimate per document."""
    import os

    import pytest

    model = pytest.importorskip("pretrain.model")
    fixtures = os.path.join(os.path.dirname(__file__), "..", "fixtures", "hnet_2stage_L.json")
    cfg = model.HNetConfig.from_json(fixtures)
    if not getattr(cfg, "ratio_targets", None):
        cfg = model.HNetConfig.from_dict({**cfg.to_dict(), "ratio_targets": [3.0, 3.0]})
    cm = DocCostModel.from_model_config(cfg)
    for n in (100, 8192, 100_000):
        assert cm(n) == pytest.approx(model.document_flops(cfg, n))
