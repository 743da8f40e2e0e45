"""The six public configs build with the public parameter names, shapes and counts."""
import re
from pathlib import Path

import pytest
import torch

from pretrain.model import HNetConfig, HNetForCausalLM, num_parameters

FIXTURES = Path(__file__).parent.parent / "fixtures"
PUBLIC = ["hnet_1stage_L", "hnet_1stage_XL", "hnet_2stage_L", "hnet_2stage_XL", "hnet_2stage_XL_chinese",
          "hnet_2stage_XL_code"]


def build_meta(name):
    config = HNetConfig.from_json(FIXTURES / f"{name}.json")
    with torch.device("meta"):
        return config, HNetForCausalLM(config)


def expected_shape(config, name):
    """The shape of a public parameter name, or None if unknown: the shapes of the public H-Net
    code (goombalab/hnet) and of mamba_ssm's Mamba2 (in_proj [2*d_inner + 2*ngroups*d_state +
    nheads, D], depthwise conv1d over d_inner + 2*ngroups*d_state channels, dt_bias / A_log / D
    [nheads], gated norm [d_inner], out_proj [D, d_inner]; Wqkv [3D, D]; SwiGLU fc1 [2*hidden, D])."""
    level = min(name.count("main_network."), config.num_stages)
    if name.startswith(("embeddings.", "lm_head.")):
        return (256, config.d_model[0])
    D = config.d_model[level]
    ssm = config.ssm_cfg
    di, ds, ng = ssm.expand * D, ssm.d_state, ssm.ngroups
    nh = di // ssm.headdim
    hidden = (config.d_intermediate[level] + 127) // 128 * 128
    table = [
        (r"\.norm[12]\.weight$|\.rmsnorm\.weight$", (D,)),
        (r"\.mixer\.in_proj\.weight$", (2 * di + 2 * ng * ds + nh, D)),
        (r"\.mixer\.conv1d\.weight$", (di + 2 * ng * ds, 1, ssm.d_conv)),
        (r"\.mixer\.conv1d\.bias$", (di + 2 * ng * ds,)),
        (r"\.mixer\.(dt_bias|A_log|D)$", (nh,)),
        (r"\.mixer\.norm\.weight$", (di,)),
        (r"layers\.\d+\.mixer\.out_proj\.weight$", None),  # depends on the mixer kind, below
        (r"\.mixer\.Wqkv\.weight$", (3 * D, D)),
        (r"\.mlp\.fc1\.weight$", (2 * hidden, D)),
        (r"\.mlp\.fc2\.weight$", (D, hidden)),
        (r"routing_module\.[qk]_proj_layer\.weight$", (D, D)),
        (r"residual_proj\.weight$", (D, D)),
        (r"residual_proj\.bias$", (D,)),
        (r"pad_dimension$", (D - config.d_model[level - 1],)),
    ]
    for pattern, shape in table:
        if re.search(pattern, name):
            return shape
    return "unknown"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_config_names_shapes_and_count(name):
    config, model = build_meta(name)
    params = dict(model.named_parameters())
    allowed_prefix = re.compile(r"^(embeddings|lm_head|backbone\.(main_network\.)*(encoder|decoder|main_network|"
                                r"routing_module|residual_proj|pad_dimension))")
    for pname, p in params.items():
        assert allowed_prefix.match(pname), pname
        shape = expected_shape(config, pname)
        assert shape != "unknown", f"parameter not in the public table: {pname}"
        if shape is None:  # out_proj: Mamba-2 (D, d_inner) or attention (D, D)
            sibling = pname.replace("out_proj.weight", "in_proj.weight")
            level = min(pname.count("main_network."), config.num_stages)
            D = config.d_model[level]
            shape = (D, config.ssm_cfg.expand * D) if sibling in params else (D, D)
        assert tuple(p.shape) == tuple(shape), f"{pname}: {tuple(p.shape)} != {shape}"
    # a few names spelled out, as a public checkpoint has them
    S = config.num_stages
    inner = "backbone." + "main_network." * S + "main_network."
    for required in ["embeddings.weight", "lm_head.weight", "backbone.encoder.layers.0.mixer.in_proj.weight",
                     "backbone.encoder.rmsnorm.weight", "backbone.routing_module.q_proj_layer.weight",
                     "backbone.residual_proj.weight",
                     "backbone.decoder.layers.3.mixer.out_proj.weight", inner + "layers.0.mixer.Wqkv.weight",
                     inner + "layers.0.mlp.fc1.weight", inner + "rmsnorm.weight"]:
        assert required in params, required
    for level in range(1, S + 1):
        pad = "backbone." + "main_network." * level + "pad_dimension"
        assert (pad in params) == (config.d_model[level] > config.d_model[level - 1]), pad
    count = sum(p.numel() for p in params.values())
    print(f"{name}: {count:,} parameters")
    assert count == num_parameters(config)


def test_1stage_L_count_by_hand():
    """hnet_1stage_L worked out by hand from the public code's shapes (see expected_shape)."""
    _, model = build_meta("hnet_1stage_L")
    mamba_1024 = (1024 * (2 * 2048 + 2 * 128 + 32)  # in_proj
                  + 2304 * 4 + 2304  # conv1d weight + bias
                  + 3 * 32  # dt_bias, A_log, D
                  + 2048  # gated norm
                  + 2048 * 1024  # out_proj
                  + 1024)  # norm1
    attn_block_1536 = 1536 + 3 * 1536 * 1536 + 1536 * 1536 + 1536 + 1536 * 2 * 4096 + 4096 * 1536
    expected = (2 * 256 * 1024  # embeddings + lm_head
                + 8 * mamba_1024 + 2 * 1024  # encoder + decoder with their final norms
                + 2 * 1024 * 1024  # routing q, k
                + 1024 * 1024 + 1024  # residual_proj
                + 512  # pad_dimension 1536 - 1024
                + 22 * attn_block_1536 + 1536)  # main network
    count = sum(p.numel() for p in model.parameters())
    print(f"hnet_1stage_L by hand: {expected:,}")
    assert count == expected


def test_public_state_dict_roundtrip_strict(tmp_path):
    """A state dict saved under the public names loads with strict=True through load_public_checkpoint."""
    from pretrain.model import load_public_checkpoint
    from tests.model.conftest import tiny_model

    model = tiny_model(1)
    torch.save(model.state_dict(), tmp_path / "tiny.pt")
    (tmp_path / "tiny.json").write_text(__import__("json").dumps(model.config.public_dict()))
    loaded = load_public_checkpoint(tmp_path / "tiny.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
