"""Building the DeepSpeed engine (ZeRO-1/2/3, optional CPU offload) around a plain PyTorch H-Net.

The DeepSpeed JSON in `ds_configs/` describes only how state is sharded; the keys the trainer
owns (batch sizes, gradient accumulation, clipping, precision, optimizer, scheduler) are filled in
here from the experiment config, and a file that sets one of them to something else is refused,
so the two can never disagree.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from pretrain.errors import ConfigError

# Keys the trainer derives from the experiment config. The gradient-accumulation count is fixed at 1
# because the step (parallel/step.py) drives the accumulation boundary itself: the number of
# micro-batches varies per step, and with GAS=1 DeepSpeed's own 1/GAS loss scaling is a no-op, so
# the token weighting is applied exactly once, by the step.
TRAINER_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                "gradient_clipping", "bf16", "fp16", "torch_autocast", "optimizer", "scheduler")


REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(path: str) -> Path:
    """A relative path that does not exist from the working directory is looked up in the repository
    (so `ds_configs/zero3.json` works from any run directory)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    alt = REPO_ROOT / p
    return alt if alt.exists() else p


def _deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def trainer_owned_values(cfg, world_size: int) -> dict:
    """What the experiment config says for each trainer-owned DeepSpeed key."""
    bf16 = cfg.train.precision == "bf16"
    return {
        "train_micro_batch_size_per_gpu": 1,  # one packed row per micro-batch
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        # bf16 runs under torch autocast: parameters and the master copy stay fp32, so the
        # modules the model keeps in fp32 (residual_proj) really stay fp32.
        "torch_autocast": {"enabled": bf16, "dtype": "bfloat16"},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }


def _same(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return all(k in b and _same(v, b[k]) for k, v in a.items())
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def resolve_ds_config(cfg, world_size: int) -> dict:
    """Reads `cfg.train.ds_config`, merges `cfg.train.ds_overrides`, fills the trainer-owned keys.

    Raises ConfigError naming the key and the file when the file contradicts the experiment
    config (a trainer key with another value, or an optimizer / scheduler section).
    """
    path = repo_path(cfg.train.ds_config)
    if not path.is_file():
        raise ConfigError(f"train.ds_config: no such DeepSpeed file {str(path)!r}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config: {path} is not valid JSON: {e}") from None
    for key in cfg.train.ds_overrides:
        if key in TRAINER_KEYS:
            raise ConfigError(f"train.ds_overrides.{key}: the trainer sets this DeepSpeed key from the experiment config")
    ds = _deep_merge(ds, cfg.train.ds_overrides)
    owned = trainer_owned_values(cfg, world_size)
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(f"{path}: sets '{key}', which contradicts the experiment config (the trainer builds "
                              f"torch.optim.AdamW from optim.* and the LR schedule from schedule.*); remove it")
    for key, value in owned.items():
        if key in ds and not _same(ds[key], value):
            if key in ("bf16", "fp16", "torch_autocast"):
                ds_says = ds[key].get("enabled") if isinstance(ds[key], dict) else ds[key]
                our = value.get("enabled") if isinstance(value, dict) else value
                if bool(ds_says) == bool(our):
                    continue
                raise ConfigError(f"{path}: '{key}.enabled'={ds_says} contradicts train.precision="
                                  f"{cfg.train.precision!r}")
            source = {"gradient_clipping": "optim.grad_clip"}.get(key, "the trainer (one row per micro-batch, "
                                                                         "accumulation driven by the step)")
            raise ConfigError(f"{path}: '{key}'={ds[key]!r} contradicts the experiment config ({source} gives "
                              f"{value!r}); remove it from the DeepSpeed file")
        ds[key] = copy.deepcopy(value)
    ds.setdefault("checkpoint", {})["load_universal"] = False
    zero = ds.get("zero_optimization", {})
    if zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage must be 0..3, got {zero.get('stage')!r}")
    if zero.get("stage", 0) > 0 and "overlap_comm" not in zero:
        zero["overlap_comm"] = overlap_comm_default(cfg)
    return ds


def overlap_comm_default(cfg) -> bool:
    """ZeRO's `overlap_comm` where the DeepSpeed file does not set it: on with CUDA, where the
    gradient reductions (and ZeRO-3's gathers) then run on a side stream behind the backward, as
    DeepSpeed itself defaults for stage 3; off on CPU, where the accelerator has no second stream
    (gloo collectives run in the calling thread), and off for pipeline stage engines, whose
    interleaving of backward passes with stage-to-stage sends has not been run with it on a GPU."""
    on_cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    return on_cuda and cfg.parallel.pipeline_stages == 1


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def build_optimizer(model: torch.nn.Module, cfg, lr_mults: list[float],
                    reference: torch.nn.Module | None = None) -> tuple[torch.optim.Optimizer, list[float]]:
    """torch.optim.AdamW over the model's groups (per-stage lr multiplier x weight decay / none).
    `reference`: the full model, when `model` is a pipeline stage named like it.

    Returns the optimizer and the lr multiplier of every group, in group order.
    """
    from pretrain.model import param_groups_spec

    groups = [g for g in param_groups_spec(model, lr_mults, cfg.optim.weight_decay, reference) if len(g["params"]) > 0]
    for g in groups:
        g["lr"] = cfg.optim.lr * g["lr_mult"]
    opt = torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=tuple(cfg.optim.betas), eps=cfg.optim.eps,
                            weight_decay=cfg.optim.weight_decay, foreach=False)
    return opt, [g["lr_mult"] for g in groups]


def build_engine(model: torch.nn.Module, cfg, ds_config: dict, lr_mults: list[float], mpu=None,
                 reference: torch.nn.Module | None = None):
    """deepspeed.initialize with ZeRO-3 leaves registered; returns (engine, group lr multipliers).
    `mpu`: the process grid of a pipelined run; `reference`: the full model of a pipeline stage."""
    import deepspeed
    from deepspeed.utils import set_z3_leaf_modules

    from pretrain.model import zero3_leaf_modules

    if zero_stage(ds_config) == 3:
        # only the classes this model (or pipeline stage) holds: DeepSpeed refuses a class it cannot find
        leaves = [c for c in zero3_leaf_modules() if any(isinstance(m, c) for m in model.modules())]
        if leaves:
            set_z3_leaf_modules(model, leaves)
    optimizer, group_mults = build_optimizer(model, cfg, lr_mults, reference)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, mpu=mpu)
    return engine, group_mults
