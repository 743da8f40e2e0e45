"""FLOP estimates, eq. 11 multipliers, parameter groups."""
import pytest

from pretrain.model import (HNetConfig, attention_pairs, document_flops, flops_per_byte, lr_multipliers,
                            no_weight_decay, param_groups_spec)
from tests.model.conftest import tiny_model
from tests.model.test_public_configs import FIXTURES


def brute_pairs(m, w):
    return sum(1 for i in range(m) for j in range(i + 1) if w is None or i - j <= w)


@pytest.mark.parametrize("m, w", [(1, None), (10, None), (10, 3), (10, 20), (50, 0)])
def test_attention_pairs(m, w):
    assert attention_pairs(m, w) == brute_pairs(m, w)


def test_lr_multipliers_match_paper():
    l1 = HNetConfig.from_json(FIXTURES / "hnet_1stage_L.json")
    assert [round(x, 2) for x in lr_multipliers(l1)] == [2.63, 0.88]
    l2 = HNetConfig.from_json(FIXTURES / "hnet_2stage_L.json")
    # the paper prints 0.72 for the innermost level; eq. 11 gives sqrt(4.6 / 9) = 0.715
    assert lr_multipliers(l2) == pytest.approx([2.63, 1.52, 0.72], abs=0.006)


def test_flops_scale_with_compression_and_length():
    cfg = HNetConfig.from_json(FIXTURES / "hnet_1stage_L.json")
    # more compression -> less inner work per byte
    assert flops_per_byte(cfg, [8.0]) < flops_per_byte(cfg, [4.0])
    # full attention inside: cost per byte grows with document length
    assert document_flops(cfg, 16384) / 16384 > document_flops(cfg, 1024) / 1024
    # about 6 x parameters per inner position for the main network (the dominant term) + outer
    fpb = flops_per_byte(cfg, [6.0])
    assert 6 * 622e6 / 6 < fpb < 6 * 680e6


def test_param_groups_cover_every_parameter_once():
    model = tiny_model(2)
    mults = lr_multipliers(model.config)
    groups = param_groups_spec(model, mults, weight_decay=0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    nwd = no_weight_decay(model)
    for name in ("backbone.encoder.layers.0.mixer.A_log", "backbone.encoder.layers.0.mixer.D",
                 "backbone.encoder.layers.0.mixer.dt_bias", "backbone.encoder.layers.0.norm1.weight",
                 "backbone.encoder.layers.0.mixer.norm.weight", "backbone.encoder.rmsnorm.weight",
                 "backbone.residual_proj.bias", "backbone.main_network.main_network.pad_dimension",
                 "backbone.encoder.layers.0.mixer.conv1d.bias"):
        assert name in nwd, name
    assert "backbone.encoder.layers.0.mixer.in_proj.weight" not in nwd
    by_name = {g["name"]: g for g in groups}
    assert by_name["stage0/decay"]["lr_mult"] == mults[0]
    assert by_name["stage2/decay"]["lr_mult"] == mults[2]
    assert by_name["stage0/no_decay"]["weight_decay"] == 0.0
