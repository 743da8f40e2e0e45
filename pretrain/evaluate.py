"""Evaluation on the held-out shards: bits per byte, bytes per chunk and boundary quality
(pretrain/chunks.py) of every stage.

Every rank reads its share of the held-out split (a fresh loader per evaluation, one epoch,
capped at train.eval_max_steps steps); the executor runs the forward passes and hands back the
outputs of the micro-batches on the rank that computes the loss; sums are reduced over all
ranks, so bits per byte are token-weighted over the whole split whatever the layout.
"""
from __future__ import annotations

import math

from parallel.distributed import all_reduce_sum


class Evaluator:
    def __init__(self, executor, make_loader, n_stages: int, max_steps: int = 0, picture_bytes: int = 1500):
        self.executor, self.make_loader = executor, make_loader
        self.n_stages, self.max_steps = n_stages, max_steps
        self.picture_bytes = picture_bytes
        self.picture: tuple[bytes, list] | None = None  # after run(): the first held-out passage and its boundaries

    def run(self) -> dict[str, float]:
        """eval/bpb and eval/compression/stage{s} over the held-out split (all ranks take part)."""
        from parallel.step import stage_stats

        from pretrain.chunks import BoundarySums

        loss_sum = n_targets = n_bytes = 0.0
        bpc = [0.0] * self.n_stages
        quality = BoundarySums(self.n_stages)
        self.picture = None
        loader = self.make_loader()
        self.executor.module.eval()
        try:
            for i, batch in enumerate(self.executor.batches(loader)):
                if self.max_steps and i >= self.max_steps:
                    break  # every rank breaks at the same step: the loader gives all ranks equal step counts
                for mb, out in self.executor.eval_step(batch):
                    loss_sum += float(out.loss_sum)
                    n_targets += int(mb.n_targets)
                    n_bytes += int(mb.n_bytes)
                    per_stage, _ = stage_stats(out)
                    for s in range(self.n_stages):
                        bpc[s] += per_stage[s] * mb.n_bytes
                    masks, probs = [st.boundary_mask for st in out.stages], [st.boundary_prob for st in out.stages]
                    quality.add(mb.input_ids, mb.cu_seqlens, out.logits[0], mb.labels, masks, probs)
                    if self.picture is None:
                        self.picture = passage_picture(mb, masks, probs, self.picture_bytes)
        finally:
            self.executor.module.train()
            if loader is not None:
                loader.close()
        tot = all_reduce_sum([loss_sum, n_targets, n_bytes] + bpc + quality.vector())
        metrics = {"eval/bpb": tot[0] / max(1.0, tot[1]) / math.log(2)}
        for s in range(self.n_stages):
            metrics[f"eval/compression/stage{s}"] = tot[3 + s] / max(1.0, tot[2])
        metrics.update(quality.from_vector(tot[3 + self.n_stages:]).metrics("eval"))
        return metrics


def passage_picture(mb, masks: list, probs: list, max_bytes: int) -> tuple[bytes, list]:
    """The first document of a held-out micro-batch (the same passage at every evaluation: the
    eval loader starts afresh each time) and every stage's boundaries over its bytes."""
    from pretrain.chunks import byte_level_boundaries

    cu = mb.cu_seqlens.tolist()
    start, end = cu[0], min(cu[1], cu[0] + max_bytes, masks[0].numel())
    ids = mb.input_ids.reshape(-1)[start:end].tolist()
    per_stage = [(m[start:end].tolist(), p[start:end].tolist()) for m, p in byte_level_boundaries(masks, probs)]
    if ids and ids[0] == 254:  # the BOS byte is not text
        ids, per_stage = ids[1:], [(m[1:], p[1:]) for m, p in per_stage]
    return bytes(ids), per_stage
