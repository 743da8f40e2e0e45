"""Bytes from disk to packed, balanced micro-batches: shard writer, stateful reader, packer, balancer.

Public names load lazily, so `python -m data_pipeline.shard` (the writer CLI) starts without torch.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "BalancedStepLoader": "loader", "StepBatch": "loader", "PrefetchingLoader": "prefetch",
    "ByteCost": "balance", "partition_lpt": "balance", "plan_step": "balance",
    "MicroBatch": "batch", "IGNORE_INDEX": "batch",
    "BOS": "packer", "Piece": "packer", "pack_row": "packer", "split_piece": "packer",
    "ShardInfo": "index", "load_index": "index", "index_existing_shards": "index",
    "WriterOptions": "shard", "write_shards": "shard", "shard_files": "shard", "shard_demo": "shard",
    "DataError": "tario",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'data_pipeline' has no attribute {name!r}")


def __dir__():
    return __all__
