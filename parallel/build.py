"""Building the executor a run trains with: the model on its device, wrapped for one step over the engine(s).

    train.engine=plain       one process, torch.optim.AdamW: PlainStep (the reference)
    train.engine=deepspeed   one DeepSpeed engine over all ranks (ZeRO-1/2/3): ZeroStep
    parallel.pipeline_stages=P > 1   the hierarchy split over P pipeline ranks, one ZeRO-3 engine
                             per stage over its data-parallel replicas: PipelineStep

`cfg` is the experiment config (read by attribute; this package does not import the trainer's
config module).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

from pretrain.errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def device_for(local_rank: int) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK (LOCAL_RANK is the GPU's index among those this task
    sees, see parallel/slurm_env.py), or the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise RuntimeError(f"LOCAL_RANK={local_rank}, but this process sees {n} GPU(s) (CUDA_VISIBLE_DEVICES="
                           f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): launch one task per GPU, with the "
                           f"node's GPUs visible or one GPU bound to each task")
    return torch.device("cuda", local_rank)


def level_multipliers(cfg, model_cfg) -> list[float]:
    """Per hierarchy level learning-rate multipliers: schedule.lr_multipliers, or eq. 11 of the paper."""
    from pretrain.model import lr_multipliers

    mults = list(cfg.schedule.lr_multipliers or lr_multipliers(model_cfg))
    if len(mults) != model_cfg.num_stages + 1:
        raise ConfigError(f"schedule.lr_multipliers: expected {model_cfg.num_stages + 1} values (one per hierarchy "
                          f"level, outer first), got {mults}")
    return mults


def build_model(cfg, model_cfg) -> torch.nn.Module:
    """The full H-Net with identical initial weights on every rank (seeded from train.seed)."""
    from pretrain.model import HNetForCausalLM

    seed_everything(cfg.train.seed)
    model = HNetForCausalLM(model_cfg)
    if cfg.train.activation_checkpointing:
        model.set_activation_checkpointing(True)
    return model


def build_executor(cfg, info, model_cfg, ds_config: dict | None):
    """Returns (executor, lr multiplier of every optimizer group, lr multiplier of every level)."""
    from parallel.engine import build_engine, build_optimizer
    from parallel.step import PlainStep, ZeroStep

    if cfg.parallel.pipeline_stages > 1:
        return build_pipeline_executor(cfg, info, model_cfg, ds_config)
    device = device_for(info.local_rank)
    model = build_model(cfg, model_cfg)
    mults = level_multipliers(cfg, model_cfg)
    if ds_config is None:
        model.to(device)
        opt, group_mults = build_optimizer(model, cfg, mults)
        autocast = torch.bfloat16 if cfg.train.precision == "bf16" else None
        return PlainStep(model, opt, model_cfg.num_stages, cfg.optim.grad_clip, device, autocast), group_mults, mults
    engine, group_mults = build_engine(model, cfg, ds_config, mults)
    return ZeroStep(engine, model_cfg.num_stages, info.rank, info.world_size), group_mults, mults


def pipeline_ds_config(cfg, ds_config: dict) -> dict:
    """A stage engine's DeepSpeed config: ZeRO-3 only; the checkpoint tag differs per stage (each
    saves into its own pipe{k} folder), so DeepSpeed's cross-rank tag check is off; with
    parallel.keep_params_gathered every parameter stays whole after its first gather."""
    import copy

    from parallel.engine import zero_stage
    from parallel.pipeline.zero3 import stage_engine_config

    if zero_stage(ds_config) != 3:
        raise ConfigError(f"parallel.pipeline_stages > 1 runs one ZeRO-3 engine per stage: train.ds_config must be "
                          f"a ZeRO stage 3 file (got stage {zero_stage(ds_config)})")
    ds = copy.deepcopy(ds_config)
    ds.setdefault("checkpoint", {})["tag_validation"] = "Ignore"
    if cfg.parallel.keep_params_gathered:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 2 ** 62
    return stage_engine_config(ds)


def build_pipeline_executor(cfg, info, model_cfg, ds_config: dict):
    """The pipeline grid, this rank's stage of the model and its ZeRO-3 engine."""
    from parallel.engine import build_engine
    from parallel.pipeline import PipelineGrid, PipelineStage, PipelineStep, split_levels

    from parallel.pipeline.zero3 import keep_persistent_params, one_checkpoint_part_per_stage, scope_trace_check_to

    grid = PipelineGrid(cfg.parallel.pipeline_stages, timeout_s=cfg.train.collective_timeout_s)
    scope_trace_check_to(grid.dp_group)
    levels = split_levels(model_cfg, grid.pp, cfg.parallel.pipeline_levels)
    model = build_model(cfg, model_cfg)  # the full model on every rank, so every stage starts from the same weights
    stage = PipelineStage(model, levels[grid.stage], grid.stage, grid.pp)
    mults = level_multipliers(cfg, model_cfg)
    engine, group_mults = build_engine(stage, cfg, pipeline_ds_config(cfg, ds_config), mults, mpu=grid,
                                       reference=model)
    del model  # only this stage's modules stay referenced: no rank holds another stage's parameters
    one_checkpoint_part_per_stage(engine)
    keep_persistent_params(engine)
    executor = PipelineStep(engine, stage, grid, cfg.parallel.schedule, cfg.parallel.micro_batches_in_flight)
    return executor, group_mults, mults
