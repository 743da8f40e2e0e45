"""What one pipeline rank holds of an H-Net, and the pieces of work it runs.

The split follows the hierarchy (see schedule.py for the V placement): pipeline rank k holds
a contiguous group of hierarchy levels. A rank that is not the last holds, of each of its
levels, the encoder, routing module, residual projection, decoder and `pad_dimension`, but not
the levels inside them; rank 0 also holds the embeddings and the LM head. The last rank holds
its first level whole, with everything inside it (the innermost main network included).

`PipelineStage` is the module DeepSpeed wraps on that rank. Its parameter names are the full
model's (`backbone.main_network.encoder...`): the owned submodules are re-registered under
containers that mirror the full model's paths, so checkpoints of every stage consolidate by a
plain union into the public state dict. The model's own code does the work (`encode_level`,
`decode_level`, `HNet.forward`); this file only decides which rank runs which part.

Pieces, all through `forward(piece, ...)` so ZeRO-3's module hooks gather the parameters:
    down  (not the last rank)  rank 0: embed; then encode each of its levels  -> chunked hidden
    turn  (the last rank)      its first level whole: encoders, the inner levels, decoders
    up    (not the last rank)  decode its levels, innermost first; rank 0: LM head
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pretrain.model.hnet import HNet, HNetForCausalLM, decode_level, encode_level
from pretrain.model.flops import level_flops_per_byte


class LevelShard(nn.Module):
    """An outer level without the levels inside it: encoder, routing, residual_proj, decoder, pad."""

    def __init__(self, level: HNet):
        super().__init__()
        self.stage, self.d_model = level.stage, level.d_model
        self.encoder, self.decoder = level.encoder, level.decoder
        self.routing_module, self.residual_proj = level.routing_module, level.residual_proj
        self.pad_dimension = level.pad_dimension  # the same Parameter (or None)

    def forward(self, part: str, *args):
        return encode_level(self, *args) if part == "encode" else decode_level(self, *args)


def split_levels(model_cfg, pipeline_stages: int, levels_per_rank: list[int] | None = None) -> list[list[int]]:
    """The hierarchy levels of each pipeline rank, outer first: `levels_per_rank` as given, or the
    contiguous grouping whose costliest rank (by the FLOP estimate at the ratio targets) is cheapest."""
    n_levels = model_cfg.num_stages + 1
    if pipeline_stages > n_levels:
        raise ValueError(f"parallel.pipeline_stages={pipeline_stages}: this H-Net has {n_levels} hierarchy levels "
                         f"({model_cfg.num_stages} routing stages + the main network), so it splits into at most "
                         f"{n_levels} pipeline ranks")
    if levels_per_rank:
        if len(levels_per_rank) != pipeline_stages or any(n < 1 for n in levels_per_rank) \
                or sum(levels_per_rank) != n_levels:
            raise ValueError(f"parallel.pipeline_levels={levels_per_rank}: give {pipeline_stages} positive counts "
                             f"that add up to the model's {n_levels} hierarchy levels")
        counts = list(levels_per_rank)
    else:
        cost = level_flops_per_byte(model_cfg)
        best = None
        for cuts in _compositions(n_levels, pipeline_stages):
            loads, i = [], 0
            for c in cuts:
                loads.append(sum(cost[i:i + c]))
                i += c
            if best is None or max(loads) < best[0]:
                best = (max(loads), cuts)
        counts = best[1]
    out, i = [], 0
    for c in counts:
        out.append(list(range(i, i + c)))
        i += c
    return out


def _compositions(n: int, k: int):
    if k == 1:
        yield [n]
        return
    for first in range(1, n - k + 2):
        for rest in _compositions(n - first, k - 1):
            yield [first, *rest]


def _levels(model: HNetForCausalLM) -> list[HNet]:
    out, level = [], model.backbone
    while True:
        out.append(level)
        if level.is_innermost:
            return out
        level = level.main_network


class PipelineStage(nn.Module):
    """The part of the model pipeline rank `rank` (of `p`) holds; see the module docstring."""

    def __init__(self, model: HNetForCausalLM, levels: list[int], rank: int, p: int):
        super().__init__()
        self.config = model.config
        self.levels, self.rank, self.p = list(levels), rank, p
        self.is_first, self.is_last = rank == 0, rank == p - 1
        full = _levels(model)
        self.first_level = levels[0]
        if self.is_first:
            self.embeddings, self.lm_head = model.embeddings, model.lm_head
        # mirror the full model's path to the first owned level: backbone(.main_network)*
        holder = self
        path = ["backbone"] + ["main_network"] * self.first_level
        for name in path[:-1]:
            child = getattr(holder, name, None) or nn.Module()
            setattr(holder, name, child)
            holder = child
        shards: list[nn.Module] = []
        if self.is_last:
            setattr(holder, path[-1], full[self.first_level])  # the whole inner hierarchy
            shards.append(full[self.first_level])
        else:
            for lv in levels:
                shard = LevelShard(full[lv])
                setattr(holder, "backbone" if lv == 0 else "main_network", shard)
                shards.append(shard)
                holder = shard
        self._shards = shards  # plain list: already registered above, do not register twice
        # the routing levels whose statistics this rank computes (its outer levels)
        self.routing_levels = [lv for lv in levels if lv < self.config.num_stages]

    def level_modules(self) -> list[nn.Module]:
        return list(self._shards)

    def forward(self, piece: str, *args):
        if piece == "down":
            return self._down(*args)
        if piece == "up":
            return self._up(*args)
        if piece == "turn":
            return self._turn(*args)
        raise ValueError(f"unknown pipeline piece {piece!r}")

    def _down(self, hidden: torch.Tensor, seqs):
        """hidden: rank 0 the byte ids (1, T); else the previous rank's chunked hidden states.
        Returns (chunked hidden, the next level's documents, the skip contexts of the levels)."""
        if self.is_first:
            hidden = self.embeddings(hidden.reshape(1, -1).long())
        contexts = []
        for shard in self._shards:
            hidden, seqs, ctx = shard("encode", hidden, seqs)
            contexts.append(ctx)
        return hidden, seqs, tuple(contexts)

    def _turn(self, hidden: torch.Tensor, seqs):
        """The last rank's levels whole: (1, T, D_outer) -> (1, T, D_outer), the routing outputs."""
        hidden, routing = self._shards[0](hidden, seqs)
        return hidden, tuple(routing)

    def _up(self, hidden: torch.Tensor, contexts: tuple):
        """The next rank's output back through this rank's decoders, innermost first; rank 0 ends
        with the LM head's logits (1, T, 256)."""
        for shard, ctx in zip(reversed(self._shards), reversed(contexts)):
            hidden = shard("decode", hidden, ctx)
        if self.is_first:
            return self.lm_head(hidden)
        return hidden
