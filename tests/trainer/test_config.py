"""Typed experiment config, the DeepSpeed config resolution, the launcher env mapping."""
from __future__ import annotations

import json

import pytest

from parallel.distributed import map_launcher_env, slurm_port
from parallel.engine import resolve_ds_config
from pretrain.config import ConfigError, load_config
from trainer_harness import REPO, TINY

CONFIGS = REPO / "pretrain" / "configs"


def test_yaml_and_dotted_overrides():
    cfg = load_config(TINY, ["train.steps=7", "optim.betas=[0.8, 0.9]", "model.ssm_cfg.d_state=8",
                             "tracking.enabled=false", "optim.lr=1"], validate=False)
    assert cfg.train.steps == 7 and cfg.optim.betas == [0.8, 0.9] and cfg.tracking.enabled is False
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)
    md = cfg.model_dict()
    assert md["ssm_cfg"]["d_state"] == 8 and md["ssm_cfg"]["headdim"] == 16  # merged, not replaced
    assert md["ratio_targets"] == [4.0]


@pytest.mark.parametrize("override, named", [
    ("train.stpes=3", "train.stpes"), ("nonsense=1", "nonsense"), ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"), ("optim.betas=0.9", "optim.betas"), ("tracking.enabled=maybe", "tracking.enabled"),
    ("schedule.name=step", "schedule.name"), ("train.precision=fp8", "train.precision"), ("train.steps", "train.steps"),
])
def test_errors_name_the_key(override, named, demo_shards):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(TINY, [f"data.train_index=[{demo_shards['train']}]", override])


@pytest.mark.parametrize("override, named", [
    ("optim.lr=0", "optim.lr"), ("optim.lr=-1e-3", "optim.lr"), ("optim.betas=[0.9, 1.0]", r"optim.betas\[1\]"),
    ("optim.eps=-1", "optim.eps"), ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("schedule.min_lr_ratio=-0.5", "schedule.min_lr_ratio"), ("schedule.min_lr_ratio=3", "schedule.min_lr_ratio"),
    ("schedule.lr_multipliers=[2.0, 0]", r"schedule.lr_multipliers\[1\]"),
    ("train.log_every=0", "train.log_every"), ("train.eval_every=-5", "train.eval_every"),
    ("train.eval_max_steps=-1", "train.eval_max_steps"), ("train.collective_timeout_s=0", "train.collective_timeout_s"),
    ("data.round_to=0", "data.round_to"), ("data.round_to=3000", "data.round_to"),
    ("data.eval_step_bytes=-5", "data.eval_step_bytes"), ("checkpoint.every=-1", "checkpoint.every"),
    ("tracking.flush_every=0", "tracking.flush_every"), ("optim.lr=nan", "optim.lr"),
])
def test_values_outside_their_meaning_are_refused_at_start(override, named, demo_shards):
    # each would otherwise surface hours in (a modulo by zero, a first evaluation that raises) or
    # train silently wrong (a checkpoint every step, a negative learning rate through the decay)
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config(TINY, [f"data.train_index=[{demo_shards['train']}]", override])


def test_numbers_in_exponent_notation_are_numbers(tmp_path, demo_shards):
    # PyYAML (YAML 1.1) reads 1e-3 without a dot as a string; the default of optim.eps is written so
    cfg = load_config(TINY, [f"data.train_index=[{demo_shards['train']}]", "optim.eps=1e-8", "optim.lr=3e-3"])
    assert cfg.optim.eps == 1e-8 and cfg.optim.lr == 3e-3
    f = tmp_path / "c.yaml"
    f.write_text(f"data:\n  train_index: [{demo_shards['train']}]\noptim:\n  lr: 2e-4\n")
    assert load_config(str(f)).optim.lr == 2e-4
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load_config(str(f), ["optim.lr=fast"])


def test_a_config_file_that_is_not_yaml_is_named(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_config(str(f))


def test_missing_index_and_empty_list_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="data.train_index is empty"):
        load_config(TINY, ["data.train_index=[]"])
    with pytest.raises(ConfigError, match="no such shard index"):
        load_config(TINY, [f"data.train_index=[{tmp_path / 'nope.json'}]"])


@pytest.mark.parametrize("name", ["demo", "tiny", "small", "hnet_1stage_L", "hnet_2stage_L"])
def test_shipped_configs_parse_and_resolve_the_model(name):
    from pretrain.model import HNetConfig

    cfg = load_config(str(CONFIGS / f"{name}.yaml"), validate=False)
    model = HNetConfig.from_dict(cfg.model_dict())
    cfg._validate_ranges()  # the shipped values are in range (the indexes are not on this machine)
    if name == "hnet_1stage_L":
        assert model.d_model == [1024, 1536] and model.num_stages == 1
    if name == "hnet_2stage_L":
        assert model.num_stages == 2 and model.ratio_targets == [3.0, 3.0]
    for stage in (3, 1, 2):
        c = load_config(str(CONFIGS / f"{name}.yaml"), [f"train.ds_config=ds_configs/zero{stage}.json"], validate=False)
        ds = resolve_ds_config(c, world_size=4)
        assert ds["zero_optimization"]["stage"] == stage and ds["train_batch_size"] == 4
        assert ds["gradient_clipping"] == c.optim.grad_clip


def test_overlap_comm_default(monkeypatch):
    """Not in the shipped files: on with CUDA (unpipelined), off on CPU and for pipeline stages;
    a value in the file or the overrides wins."""
    import torch

    def overlap(*over):
        return resolve_ds_config(load_config(TINY, list(over), validate=False), 2)["zero_optimization"]["overlap_comm"]

    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert overlap() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert overlap() is True
    assert overlap("train.ds_config=ds_configs/zero1.json") is True
    assert overlap("parallel.pipeline_stages=2") is False
    assert overlap("train.ds_overrides={zero_optimization: {overlap_comm: false}}") is False


def test_ds_config_contradictions(tmp_path):
    base = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    cases = {
        "gradient_clipping": ({"gradient_clipping": 0.3}, "gradient_clipping"),
        "gas": ({"gradient_accumulation_steps": 8}, "gradient_accumulation_steps"),
        "bf16": ({"bf16": {"enabled": True}}, "train.precision"),
        "optimizer": ({"optimizer": {"type": "Adam"}}, "optimizer"),
    }
    for name, (extra, needle) in cases.items():
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps({**base, **extra}))
        cfg = load_config(TINY, [f"train.ds_config={p}"], validate=False)
        with pytest.raises(ConfigError, match=needle):
            resolve_ds_config(cfg, 2)
    # Agreeing values are accepted.
    p = tmp_path / "agree.json"
    p.write_text(json.dumps({**base, "gradient_clipping": 1.0, "bf16": {"enabled": False}}))
    resolve_ds_config(load_config(TINY, [f"train.ds_config={p}"], validate=False), 2)
    with pytest.raises(ConfigError, match="ds_overrides.train_batch_size"):
        resolve_ds_config(load_config(TINY, ["train.ds_overrides={train_batch_size: 2}"], validate=False), 2)


def test_launcher_env_mapping():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "1234"}
    m = map_launcher_env(torchrun)
    assert (m["RANK"], m["WORLD_SIZE"], m["LOCAL_RANK"], m["MASTER_ADDR"], m["_LAUNCHER"]) == ("3", "8", "1", "n1", "torchrun")
    slurm = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
             "SLURM_JOB_NODELIST": "localhost"}
    # the batch script of sbatch (no srun step) sees PROCID/NTASKS too: it is one plain process
    assert map_launcher_env(slurm)["_LAUNCHER"] == "single"
    slurm["SLURM_STEP_ID"] = "0"
    m = map_launcher_env(slurm)
    assert (m["RANK"], m["WORLD_SIZE"], m["LOCAL_RANK"], m["MASTER_ADDR"]) == ("5", "8", "1", "localhost")
    assert m["MASTER_PORT"] == str(slurm_port("4242")) and m["_LAUNCHER"] == "slurm"
    m = map_launcher_env({})
    assert (m["RANK"], m["WORLD_SIZE"], m["_LAUNCHER"]) == ("0", "1", "single") and int(m["MASTER_PORT"]) > 0


def test_string_fields_take_dates_and_numbers_as_text():
    cfg = load_config(None, ["run_dir=2024-06-01", "tracking.run_name=42"], validate=False)
    assert cfg.run_dir == "2024-06-01" and cfg.tracking.run_name == "42"


def test_deterministic_cuda_sets_the_cublas_workspace():
    from pretrain.train import deterministic_cuda_env

    env = {}
    deterministic_cuda_env(False, env)
    assert env == {}
    deterministic_cuda_env(True, env)
    assert env == {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    env = {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}
    deterministic_cuda_env(True, env)
    assert env["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
