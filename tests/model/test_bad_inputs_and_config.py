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
