"""Evaluation on the held-out shards: bits per byte and bytes per chunk of every stage.

Every rank reads its share of the held-out split (a fresh loader per evaluation, one epoch,
capped at train.eval_max_steps steps); the executor runs the forward passes and hands back the
outputs of the micro-batches on the rank that computes the loss; sums are reduced over all
ranks, so bits per byte are token-weighted over the whole split whatever the layout.
"""
from __future__ import annotations

import math

from parallel.distributed import all_reduce_sum


class Evaluator:
    def __init__(self, executor, make_loader, n_stages: int, max_steps: int = 0):
        self.executor, self.make_loader = executor, make_loader
        self.n_stages, self.max_steps = n_stages, max_steps

    def run(self) -> dict[str, float]:
        """eval/bpb and eval/compression/stage{s} over the held-out split (all ranks take part)."""
        from parallel.step import stage_stats

        loss_sum = n_targets = n_bytes = 0.0
        bpc = [0.0] * self.n_stages
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
        finally:
            self.executor.module.train()
            if loader is not None:
                loader.close()
        tot = all_reduce_sum([loss_sum, n_targets, n_bytes] + bpc)
        metrics = {"eval/bpb": tot[0] / max(1.0, tot[1]) / math.log(2)}
        for s in range(self.n_stages):
            metrics[f"eval/compression/stage{s}"] = tot[3 + s] / max(1.0, tot[2])
        return metrics
