"""One rank of test_plan.py: what a real DeepSpeed engine holds, counted from its tensors, and
what its collectives moved in one step (DeepSpeed's comms logger)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "trainer"))

import equiv_worker  # noqa: E402


def held(executor, zero: str) -> dict[str, int]:
    opt = executor.engine.optimizer
    params = list(executor.module.parameters())
    moments = sum(t.numel() for st in opt.optimizer.state.values() for k, t in st.items()
                  if k in ("exp_avg", "exp_avg_sq"))
    if zero == "zero3":
        return {"params": sum(p.ds_tensor.numel() + p.data.numel() for p in params),
                "master": sum(t.numel() for t in opt.fp32_partitioned_groups_flat), "optimizer": moments}
    return {"params": sum(p.numel() for p in params),
            "master": sum(t.numel() for t in opt.single_partition_of_fp32_groups), "optimizer": moments}


def measure(zero: str, micro_batches: int, info, precision: str = "fp32") -> dict:
    """Builds the engine of one ZeRO stage, runs two steps, returns what it holds and moved."""
    from deepspeed import comm

    from parallel.build import build_executor
    from parallel.engine import resolve_ds_config
    from pretrain.config import load_config
    from pretrain.model import HNetConfig

    over = json.dumps({"comms_logger": {"enabled": True, "prof_all": True, "verbose": False}})
    cfg = load_config(str(REPO / "pretrain" / "configs" / "small.yaml"),
                      ["train.engine=deepspeed", f"train.ds_config={REPO / 'ds_configs' / (zero + '.json')}",
                       f"train.ds_overrides={over}", f"train.precision={precision}"], validate=False)
    executor, _, _ = build_executor(cfg, info, HNetConfig.from_dict(cfg.model_dict()), resolve_ds_config(cfg, info.world_size))
    gen = torch.Generator().manual_seed(0)
    for k in range(2):
        mbs = [equiv_worker.make_micro_batch(gen, [512, 512], f"m{i}") for i in range(micro_batches * info.world_size)]
        step = equiv_worker.Step(mbs[info.rank::info.world_size], global_targets=sum(x.n_targets for x in mbs),
                                 global_bytes=sum(x.n_bytes for x in mbs))
        comm.comms_logger.comms_dict.clear()
        executor.train_step(step)
    moved = {}
    for op, sizes in comm.comms_logger.comms_dict.items():
        key = "all_gather" if "gather" in op else "reduce_scatter" if ("reduce_scatter" in op or op == "reduce") else \
            "all_reduce" if "all_reduce" in op else op
        moved[key] = moved.get(key, 0) + sum(size * v[0] for size, v in sizes.items())
    return {"held": held(executor, zero), "moved": moved, "world": info.world_size}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--zero", required=True, help="one stage or several, comma-separated: zero1,zero2,zero3")
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--precision", default="fp32", help="bf16: under DeepSpeed's torch_autocast (ds_configs/README.md)")
    a = ap.parse_args()

    from parallel.distributed import init_process_group, setup_env

    info = setup_env()
    init_process_group(info, use_deepspeed=True)
    # Several stages in one launch: one process start for all of them (each engine is built anew).
    results = {zero: measure(zero, a.micro_batches, info, a.precision) for zero in a.zero.split(",")}
    if info.rank == 0:
        Path(a.out).write_text(json.dumps(results))
    torch.distributed.barrier()
    if info.world_size > 1:  # as pretrain/train.py leaves: without the communicators' racy C++ teardown
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
