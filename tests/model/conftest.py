import pytest
import torch

from pretrain.model import HNetConfig, HNetForCausalLM


def tiny_config(stages: int = 1, **overrides) -> HNetConfig:
    """Small but complete H-Nets: Mamba-2 outer stages, attention (windowed outside, full inside)."""
    ssm = dict(d_state=8, headdim=8, chunk_size=16, d_conv=4, expand=2)
    if stages == 1:
        d = dict(arch_layout=["m2", ["T2"], "m2"], d_model=[32, 48], d_intermediate=[0, 96],
                 attn_cfg=dict(num_heads=[2, 4], rotary_emb_dim=[8, 6], window_size=[7, -1]))
    else:
        d = dict(arch_layout=["m1", ["T1m1", ["T2"], "m1T1"], "m1"], d_model=[32, 32, 48],
                 d_intermediate=[0, 64, 96],
                 attn_cfg=dict(num_heads=[2, 2, 4], rotary_emb_dim=[8, 8, 6], window_size=[7, 5, -1]))
    d["ssm_cfg"] = ssm
    d.update(overrides)
    return HNetConfig.from_dict(d)


def tiny_model(stages: int = 1, seed: int = 0, dtype=torch.float32, **overrides) -> HNetForCausalLM:
    torch.manual_seed(seed)
    model = HNetForCausalLM(tiny_config(stages, **overrides)).to(dtype)
    # Zero-init residual_proj and identity routing make the skip path and the routing trivially
    # simple at init; perturb them so the tests exercise every path with non-trivial values.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "residual_proj" in name or "routing_module" in name or "pad_dimension" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def tiny():
    return tiny_model
