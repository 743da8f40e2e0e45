"""Bad inputs and bad configs fail with errors that name the problem."""
import json
import subprocess
import sys

import pytest
import torch

from pretrain.model import ConfigError, HNetConfig, load_public_checkpoint
from pretrain.model.checkpoint_io import CheckpointMismatchError
from tests.model.conftest import tiny_config, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model(1)


def test_byte_ids_out_of_range(model):
    with pytest.raises(ValueError, match=r"byte ids in 0..255"):
        model(torch.tensor([[1, 2, 256]]))
    with pytest.raises(ValueError, match=r"byte ids in 0..255"):
        model(torch.tensor([[-1, 2, 3]]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.rand(1, 5))


def test_bad_cu_seqlens(model):
    ids = torch.randint(0, 256, (1, 10))
    with pytest.raises(ValueError, match="cover the row"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int32))
    with pytest.raises(ValueError, match="strictly increasing"):
        model(ids, cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="empty document"):
        model(ids, cu_seqlens=torch.tensor([0, 4, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="start at 0"):
        model(ids, cu_seqlens=torch.tensor([1, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="one packed row"):
        model(torch.randint(0, 256, (2, 5)), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))


def test_empty_input(model):
    with pytest.raises(ValueError, match="empty"):
        model(torch.zeros(1, 0, dtype=torch.long))


def base_dict():
    return tiny_config(1).to_dict()


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(d_model=[32]), "d_model"),
    (lambda d: d.update(d_intermediate=[0, 96, 96]), "d_intermediate"),
    (lambda d: d["attn_cfg"].update(num_heads=[2]), "attn_cfg.num_heads"),
    (lambda d: d["attn_cfg"].update(num_heads=[2, 5]), "attn_cfg.num_heads"),
    (lambda d: d.update(d_model=[48, 32]), "d_model"),
    (lambda d: d.update(arch_layout=["m2", ["X2"], "m2"]), "arch_layout"),
    (lambda d: d.update(arch_layout=["m2", ["T2"]]), "arch_layout"),
    (lambda d: d.update(ratio_targets=[1.0]), "ratio_targets"),
    (lambda d: d.update(bogus=1), "bogus"),
    (lambda d: d["ssm_cfg"].update(headdim=7), "ssm_cfg.headdim"),
])
def test_bad_config_names_the_field(mutate, field):
    d = base_dict()
    mutate(d)
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        HNetConfig.from_dict(d)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        HNetConfig.from_json(tmp_path / "nope.json")


def test_checkpoint_of_another_model_is_reported(tmp_path):
    small = tiny_model(1)
    torch.save(small.state_dict(), tmp_path / "ckpt.pt")
    other = tiny_config(1).to_dict()
    other["d_model"] = [32, 64]
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(CheckpointMismatchError, match=r"shape mismatch.*checkpoint \(.*\) vs model"):
        load_public_checkpoint(tmp_path / "ckpt.pt", tmp_path / "other.json")
    two_stage = tiny_config(2).to_dict()
    (tmp_path / "two.json").write_text(json.dumps(two_stage))
    with pytest.raises(CheckpointMismatchError, match="missing key"):
        load_public_checkpoint(tmp_path / "ckpt.pt", tmp_path / "two.json")
    with pytest.raises(FileNotFoundError):
        load_public_checkpoint(tmp_path / "absent.pt", tmp_path / "two.json")


def test_cpu_path_never_imports_cuda_packages():
    code = ("import sys, torch\n"
            "from tests.model.conftest import tiny_model\n"
            "m = tiny_model(2); m(torch.randint(0, 256, (1, 40)))\n"
            "bad = [k for k in ('mamba_ssm', 'causal_conv1d', 'flash_attn') if k in sys.modules]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_yaml_and_json_give_the_same_config(tmp_path):
    import yaml

    from tests.model.test_public_configs import FIXTURES

    data = json.loads((FIXTURES / "hnet_2stage_XL.json").read_text())
    (tmp_path / "m.yaml").write_text(yaml.safe_dump({"model": data}))
    assert HNetConfig.from_yaml(tmp_path / "m.yaml") == HNetConfig.from_json(FIXTURES / "hnet_2stage_XL.json")
    assert HNetConfig.from_json(FIXTURES / "hnet_2stage_XL.json").ratio_targets == [3.0, 3.0]


def test_attn_scalars_broadcast_and_ssm_lists_are_refused():
    d = base_dict()
    d["attn_cfg"] = dict(num_heads=2, rotary_emb_dim=8, window_size=-1)
    cfg = HNetConfig.from_dict(d)
    assert cfg.attn_cfg.num_heads == [2, 2] and cfg.attn_cfg.window_size == [-1, -1]
    d = base_dict()
    d["ssm_cfg"]["d_state"] = [8, 16]
    with pytest.raises(ConfigError, match=r"ssm_cfg\.d_state"):
        HNetConfig.from_dict(d)


class Opaque:  # a pickled class instance: not loadable weights-only
    pass


def test_checkpoint_with_non_tensor_entries_and_pickles(tmp_path):
    """Non-tensor entries are dropped; a pickled object is refused unless trust_pickle=True."""
    model = tiny_model(1)
    sd = dict(model.state_dict())
    torch.save({"model": sd, "step": 7}, tmp_path / "wrapped.pt")
    (tmp_path / "wrapped.json").write_text(json.dumps(model.config.to_dict()))
    loaded = load_public_checkpoint(tmp_path / "wrapped.pt")
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)

    torch.save({**sd, "extra": Opaque()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointMismatchError, match="trust_pickle"):
        load_public_checkpoint(tmp_path / "pickled.pt", tmp_path / "wrapped.json")
    trusted = load_public_checkpoint(tmp_path / "pickled.pt", tmp_path / "wrapped.json", trust_pickle=True)
    assert torch.equal(trusted.lm_head.weight, model.lm_head.weight)
