"""The trainer's data: loaders over the training and held-out shards, with the model's cost.

The data pipeline does not import the model: the trainer hands the loader its cost function,
the model's FLOP estimate per document (`pretrain.model.DocCostModel`), and feeds measured
compression back into it (at fixed steps; the cost model is part of the loader state, so a
resumed run balances exactly as the uninterrupted one).
"""
from __future__ import annotations


def cost_model(cfg, model_cfg):
    """The balancer's cost of a document: the model's FLOP estimate, or bytes (data.cost_balance=false)."""
    if not cfg.data.cost_balance:
        return None
    from pretrain.model import DocCostModel

    return DocCostModel.from_model_config(model_cfg)


def build_loader(cfg, model_cfg, dp_rank: int, dp_world: int, eval_split: bool = False, group=None):
    """BalancedStepLoader over data.train_index (or data.eval_index: one epoch, no workers); the
    training loader builds each next step in a background thread with data.prefetch."""
    from data_pipeline import BalancedStepLoader, PrefetchingLoader

    d = cfg.data
    loader = BalancedStepLoader(
        index_paths=list(d.eval_index if eval_split else d.train_index),
        micro_batch_bytes=d.micro_batch_bytes,
        step_bytes=(d.eval_step_bytes or d.step_bytes) if eval_split else d.step_bytes,
        dp_rank=dp_rank, dp_world=dp_world,
        num_workers=0 if eval_split else d.num_workers,
        seed=d.seed, cost_model=cost_model(cfg, model_cfg),
        on_error=d.on_error, round_to=d.round_to, epochs=1 if eval_split else None, group=group,
        allow_pipe_urls=d.allow_pipe_urls)
    if eval_split or not d.prefetch:
        return loader
    return PrefetchingLoader(loader, apply_update=lambda inner, bpc: _update_cost_model(inner, model_cfg, bpc))


def feed_compression(loader, model_cfg, bytes_per_chunk: list[float]) -> None:
    """Measured bytes per chunk (cumulative, outer first) -> the loader's cost model. A prefetching
    loader holds it until no step is being built (data_pipeline.prefetch: it reaches the step
    after next, deterministically)."""
    if hasattr(loader, "update"):
        loader.update([float(b) for b in bytes_per_chunk])
    else:
        _update_cost_model(loader, model_cfg, bytes_per_chunk)


def _update_cost_model(loader, model_cfg, bytes_per_chunk) -> None:
    update = getattr(loader.cost_model, "update_from_compression", None)
    if update is not None:
        update(model_cfg, bytes_per_chunk)
