"""The metrics component: MFU from per-level compression, the peak by precision and part."""
from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.metrics import TrainMetrics, peak_tflops
from pretrain.model import HNetConfig, flops_per_byte, stage_compression

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


def two_stage_L() -> HNetConfig:
    cfg = HNetConfig.from_json(FIXTURES / "hnet_2stage_L.json")
    return HNetConfig.from_dict({**cfg.to_dict(), "ratio_targets": [3.0, 3.0]})


def test_bytes_per_chunk_become_per_level_ratios():
    assert stage_compression([3.0, 9.0]) == [3.0, 3.0]
    assert stage_compression([4.8]) == [4.8]
    assert stage_compression([2.0, 1.5]) == [2.0, 1.0]  # never below 1


def test_mfu_of_two_stage_L_uses_per_level_ratios():
    """At its targets (3, 3) the trainer measures 3 and 9 bytes per chunk; the FLOP estimate wants
    the per-level ratios. Passing the cumulative figures undercounts by about a third."""
    cfg = two_stage_L()
    right = flops_per_byte(cfg, [3.0, 3.0])
    wrong = flops_per_byte(cfg, [3.0, 9.0])
    assert right / 1e9 == pytest.approx(1.091, abs=0.002) and wrong / 1e9 == pytest.approx(0.743, abs=0.002)
    m = TrainMetrics(cfg, world_size=8)
    m.peak = 989.0
    mfu = m.mfu([3.0, 9.0], bytes_per_s=1e6)
    assert mfu == pytest.approx(right * 1e6 / (989e12 * 8))


def test_cost_model_update_uses_per_level_ratios():
    """The balancer's cost model takes the same measured bytes per chunk (cumulative, 3 and 9 at
    the targets) through the same conversion: fed 3 and 9, its attention stages sit where the
    model built at the per-level targets (3, 3) puts them, not at (3, 9)."""
    from pretrain.model.flops import DocCostModel

    cfg = two_stage_L()
    fed = DocCostModel.from_model_config(cfg, [2.0, 2.0])
    fed.update_from_compression(cfg, [3.0, 9.0])
    at_targets = DocCostModel.from_model_config(cfg, [3.0, 3.0])
    wrong = DocCostModel.from_model_config(cfg, [3.0, 9.0])
    bytes_per_position = [t[1] for t in fed.attention_terms]
    assert bytes_per_position == pytest.approx([t[1] for t in at_targets.attention_terms], rel=1e-12)
    assert bytes_per_position != pytest.approx([t[1] for t in wrong.attention_terms], rel=1e-3)
    assert max(bytes_per_position) == pytest.approx(9.0), "the innermost attention runs on 9 bytes a position"


def test_peak_by_precision_and_part():
    assert peak_tflops("NVIDIA H100 80GB HBM3", "bf16")[0] == 989.0
    assert peak_tflops("NVIDIA H100 80GB HBM3", "fp32")[0] == 67.0  # not the bf16 figure
    assert peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.0  # not the SXM figure
    assert peak_tflops("NVIDIA H100 NVL", "bf16")[0] == 835.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", "bf16")[0] == 312.0
    value, source = peak_tflops("NVIDIA H100 PCIe", "bf16", override=700.0)
    assert value == 700.0 and source == "train.peak_tflops"
    value, source = peak_tflops("Some New GPU", "bf16")
    assert value == 0.0 and "train.peak_tflops" in source
