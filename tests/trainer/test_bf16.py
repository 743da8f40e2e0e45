"""bf16 under ZeRO-3 on CPU (DeepSpeed's torch autocast works on its CPU accelerator): 2 ranks
train, the loss is finite and falls, a checkpoint resumes exactly; and residual_proj, fp32 by
design, keeps an fp32 communication dtype after deepspeed.initialize while the other linear
layers are gathered in bf16."""
from __future__ import annotations

import math
import subprocess
from pathlib import Path

import pytest

from trainer_harness import PY, REPO, Ranks, base_env, free_port, kill_when_hanging, run_ranks, train_argv, train_losses

pytestmark = pytest.mark.slow

STEPS = 10

CHECK_DTYPES = """
import torch
from parallel.build import build_executor
from parallel.distributed import init_process_group, setup_env
from parallel.engine import resolve_ds_config
from pretrain.config import load_config
from pretrain.model import HNetConfig
from deepspeed.runtime.torch_autocast import get_comm_dtype

cfg = load_config("pretrain/configs/tiny.yaml", ["train.precision=bf16"], validate=False)
info = setup_env()
init_process_group(info)
ex, _, _ = build_executor(cfg, info, HNetConfig.from_dict(cfg.model_dict()), resolve_ds_config(cfg, 1))
dtypes = {n: get_comm_dtype(p) for n, p in ex.module.named_parameters()}
assert dtypes["backbone.residual_proj.weight"] == torch.float32, dtypes
assert dtypes["backbone.residual_proj.bias"] == torch.float32, dtypes
assert dtypes["backbone.routing_module.q_proj_layer.weight"] == torch.bfloat16, dtypes
assert ex.module.backbone.residual_proj.weight.dtype == torch.float32
print("COMM DTYPES OK", flush=True)
"""


def test_residual_proj_communicated_in_fp32(tmp_path):
    env = base_env({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": str(free_port())})
    res = subprocess.run([PY, "-c", CHECK_DTYPES], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and "COMM DTYPES OK" in res.stdout, res.stdout[-2000:] + res.stderr[-3000:]


def args(run_dir: Path, shards: dict, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.train_index=[{shards['train']}]", f"train.steps={STEPS}",
            "train.precision=bf16", "checkpoint.every=4", "train.log_every=2", "tracking.enabled=false", *extra]


def test_bf16_zero3_trains_and_resumes_exactly(tmp_path, demo_shards):
    straight = tmp_path / "straight"
    run_ranks(train_argv(*args(straight, demo_shards)), 2, tmp_path, log_dir=tmp_path, timeout=300)
    losses = train_losses(straight)
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[STEPS] < losses[1] - 0.5, f"the bf16 loss did not fall: {losses}"

    resumed = tmp_path / "resumed"
    logs = tmp_path / "kill"
    logs.mkdir()
    ranks = Ranks(train_argv(*args(resumed, demo_shards, "debug.hang_at_step=6")), 2, tmp_path, log_dir=logs)
    kill_when_hanging(ranks, 6)
    logs2 = tmp_path / "resume"
    logs2.mkdir()
    run_ranks(train_argv(*args(resumed, demo_shards)), 2, tmp_path, log_dir=logs2, timeout=300)
    assert "at step 4" in (logs2 / "rank0.log").read_text()
    again = train_losses(resumed)
    for step in range(5, STEPS + 1):
        assert again[step] == losses[step], f"step {step}: {again[step]!r} vs {losses[step]!r}"


def test_plain_engine_bf16_runs_under_autocast():
    """train.engine=plain with train.precision=bf16 is not silently fp32."""
    import torch

    from parallel.build import build_executor
    from parallel.distributed import DistInfo
    from pretrain.config import load_config
    from pretrain.model import HNetConfig

    cfg = load_config(str(REPO / "pretrain" / "configs" / "tiny.yaml"), ["train.engine=plain", "train.precision=bf16"],
                      validate=False)
    ex, _, _ = build_executor(cfg, DistInfo(0, 1, 0, "single"), HNetConfig.from_dict(cfg.model_dict()), None)
    seen = []
    hook = ex.module.lm_head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    ids = torch.randint(0, 250, (1, 64))
    out = ex._forward(ids, torch.tensor([0, 64], dtype=torch.int32), torch.roll(ids, -1, 1))
    hook.remove()
    assert seen == [torch.bfloat16] and torch.isfinite(out.loss)
    assert ex.module.lm_head.weight.dtype == torch.float32  # master weights stay fp32
