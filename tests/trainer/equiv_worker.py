"""One rank of the token-weighting equivalence test (run by test_zero_equivalence.py).

Three optimizer steps over hand-made micro-batches of unequal byte counts, two per step:
- `--mode zero` with WORLD_SIZE=2: rank r takes micro-batch r of every step (GAS 1 x DP 2);
- `--mode zero` with WORLD_SIZE=1: one rank takes both (GAS 2 x DP 1);
- `--mode plain`: plain PyTorch, no DeepSpeed, both micro-batches.
Writes the global loss of every step, the final full parameters and (ZeRO-3) the shard sizes.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_pipeline.batch import IGNORE_INDEX, MicroBatch  # noqa: E402

# (document lengths) of the two micro-batches of each step: unequal totals on purpose.
LAYOUT = [([120, 380], [60]), ([700], [90, 40, 200]), ([33, 17, 250], [512])]


def make_micro_batch(gen: torch.Generator, doc_lens: list[int], tag: str) -> MicroBatch:
    ids, labels, cu = [], [], [0]
    for i, n in enumerate(doc_lens):
        doc = torch.randint(0, 200, (n,), generator=gen)
        doc[0] = 254  # BOS
        lab = torch.cat([doc[1:], torch.tensor([IGNORE_INDEX])])
        ids.append(doc)
        labels.append(lab)
        cu.append(cu[-1] + n)
    input_ids = torch.cat(ids).view(1, -1)
    lab = torch.cat(labels).view(1, -1)
    n_t = int((lab != IGNORE_INDEX).sum())
    return MicroBatch(input_ids, lab, torch.tensor(cu, dtype=torch.int32), n_bytes=cu[-1], n_targets=n_t,
                      capacity=1024, keys=[f"{tag}:{i}" for i in range(len(doc_lens))])


@dataclass
class Step:
    micro_batches: list
    global_targets: int
    global_bytes: int
    metrics: dict = field(default_factory=dict)


def all_steps() -> list[list[MicroBatch]]:
    gen = torch.Generator().manual_seed(1234)
    return [[make_micro_batch(gen, lens, f"s{s}m{m}") for m, lens in enumerate(pair)] for s, pair in enumerate(LAYOUT)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--mode", choices=["zero", "plain"], required=True)
    ap.add_argument("--ds-config", default="ds_configs/zero3.json")
    a = ap.parse_args()

    from parallel.distributed import setup_env
    from pretrain.config import load_config
    from pretrain.model import HNetConfig
    from pretrain.schedule import build_schedule
    from parallel.build import build_executor
    from parallel.distributed import init_process_group

    repo = Path(__file__).resolve().parents[2]
    cfg = load_config(str(repo / "pretrain/configs/tiny.yaml"),
                      [f"train.engine={'deepspeed' if a.mode == 'zero' else 'plain'}", f"train.ds_config={a.ds_config}",
                       "schedule.warmup_frac=0", "schedule.decay_frac=0", "optim.lr=0.001", "optim.grad_clip=1.0"],
                      validate=False)
    info = setup_env()
    model_cfg = HNetConfig.from_dict(cfg.model_dict())
    ds_config = None
    if a.mode == "zero":
        from parallel.engine import resolve_ds_config

        ds_config = resolve_ds_config(cfg, info.world_size)
    init_process_group(info, use_deepspeed=a.mode == "zero")
    executor, group_mults, _ = build_executor(cfg, info, model_cfg, ds_config)
    schedule = build_schedule(cfg, 3)

    losses = []
    init = {n: p.detach().clone().tolist() for n, p in executor.module.named_parameters()} if a.mode == "plain" else None
    for i, mbs in enumerate(all_steps(), start=1):
        mine = [mbs[info.rank]] if info.world_size == 2 else mbs
        step = Step(mine, global_targets=sum(m.n_targets for m in mbs), global_bytes=sum(m.n_bytes for m in mbs))
        schedule.apply(executor.param_groups, i, group_mults)
        res = executor.train_step(step)
        losses.append(res.loss_sum / res.n_targets + res.ratio_loss)

    result = {"losses": losses, "world": info.world_size, "init_params": init}
    module = executor.module
    if a.mode == "zero" and hasattr(next(module.parameters()), "ds_tensor"):
        import deepspeed

        shards = {n: [p.ds_tensor.numel(), p.ds_numel, bool(getattr(p, "ds_persistent", False))]
                  for n, p in module.named_parameters()}
        result["shards"] = shards
        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            params = {n: p.detach().clone().tolist() for n, p in module.named_parameters()}
    else:
        params = {n: p.detach().clone().tolist() for n, p in module.named_parameters()}
    if info.rank == 0:
        result["params"] = params
        Path(a.out).write_text(json.dumps(result))
    if info.world_size > 1:
        torch.distributed.barrier()


if __name__ == "__main__":
    main()
