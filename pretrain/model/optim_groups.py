"""Per-stage learning-rate multipliers (eq. 11) and the optimizer parameter groups."""
from __future__ import annotations

import math

import torch.nn as nn

from .config import HNetConfig

BYTES_PER_GPT2_TOKEN = 4.6  # N_GPT in eq. 11


def lr_multipliers(config: HNetConfig, ratios: list[float] | None = None) -> list[float]:
    """lambda^s = sqrt(N_GPT * prod_{i>=s} N^i / prod_i N^i * D^S / D^s), one per hierarchy
    level (outer first; the last is the innermost main network). N defaults to the ratio targets.

    1-stage L (N = 6; D 1024, 1536) -> [2.63, 0.88].
    """
    ratios = list(config.ratio_targets if ratios is None else ratios)
    S = config.num_stages
    if len(ratios) != S:
        raise ValueError(f"expected {S} compression ratios, got {ratios}")
    total = math.prod(ratios)
    d_inner = config.d_model[S]
    return [math.sqrt(BYTES_PER_GPT2_TOKEN * math.prod(ratios[s:]) / total * d_inner / config.d_model[s])
            for s in range(S + 1)]


_NO_DECAY_NAMES = ("A_log", "D", "dt_bias", "pad_dimension")


def no_weight_decay(model: nn.Module) -> set[str]:
    """Names of parameters that take no weight decay: biases, every norm weight, A_log, D,
    dt_bias, pad_dimension."""
    names = set()
    for name, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            is_norm = "norm" in type(module).__name__.lower() or "norm" in name.rsplit(".", 1)[-1]
            if pname == "bias" or pname in _NO_DECAY_NAMES or is_norm:
                names.add(full)
    return names


def parameter_stages(model: nn.Module) -> dict[str, int]:
    """Hierarchy level of every parameter: the level of the innermost HNet that owns it
    (embeddings and lm_head belong to level 0, as in the public code)."""
    from .hnet import HNet

    stages: dict[str, int] = {}

    def visit(module: nn.Module, prefix: str, level: int) -> None:
        if isinstance(module, HNet):
            level = module.stage
        for pname, _ in module.named_parameters(recurse=False):
            stages[prefix + pname] = level
        for cname, child in module.named_children():
            visit(child, f"{prefix}{cname}.", level)

    visit(model, "", 0)
    return stages


def param_groups_spec(model: nn.Module, multipliers: list[float], weight_decay: float,
                      reference: nn.Module | None = None) -> list[dict]:
    """torch.optim parameter groups, one per (level, decay or not): keys `params`, `lr_mult`,
    `weight_decay`, `name`. The scheduler multiplies each group's lr by its `lr_mult`.

    `reference`: the full H-Net whose parameter names `model` uses for a part of it (a pipeline
    stage): levels and the no-decay set are read from the full model."""
    stages = parameter_stages(reference if reference is not None else model)
    no_decay = no_weight_decay(reference if reference is not None else model)
    groups: dict[tuple[int, bool], dict] = {}
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied weights appear once
            continue
        seen.add(id(param))
        level, decay = stages[name], name not in no_decay
        g = groups.setdefault((level, decay), {
            "params": [], "lr_mult": multipliers[level], "weight_decay": weight_decay if decay else 0.0,
            "name": f"stage{level}/{'decay' if decay else 'no_decay'}"})
        g["params"].append(param)
    return [groups[k] for k in sorted(groups)]
