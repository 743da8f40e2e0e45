"""One rank of bench_pipeline.py: timed pipeline steps for every (schedule, micro-batches) pair.

Every step has `m` micro-batches per data-parallel replica of `--micro-batch-bytes` bytes each
(documents of 512 bytes); one warm-up step per pair, then `--steps` timed ones. Rank 0 writes
per pair: step time (median), the measured bubble of every rank, the schedule's theoretical
bubble, the bytes sent between stages, and the ZeRO-3 all-gather bytes of this rank per step
(DeepSpeed's communication logger); and per rank the compute time (step time minus waiting).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "trainer"))

import equiv_worker  # noqa: E402  (its micro-batch maker and step type)


def step_of(gen, m: int, dp: int, mb_bytes: int):
    mbs = [equiv_worker.make_micro_batch(gen, [512] * (mb_bytes // 512), f"m{i}") for i in range(m * dp)]
    return mbs


def all_gather_bytes() -> float:
    from deepspeed import comm

    total = 0.0
    for op, sizes in comm.comms_logger.comms_dict.items():
        if "all_gather" in op or "allgather" in op:
            total += sum(size * vals[0] for size, vals in sizes.items())
    return total


def comm_ops() -> dict[str, list]:
    """DeepSpeed's communication log of the last step: op -> [[message bytes, count], ...]."""
    from deepspeed import comm

    return {op: [[size, vals[0]] for size, vals in sorted(sizes.items())]
            for op, sizes in comm.comms_logger.comms_dict.items()}


def train_phase(executor, a, dp: int, gen, lrs: list[float]) -> list[dict]:
    """`--train-steps` V steps of 4 micro-batches at the config's learning rate: per step the
    compression ratio and each rank's compute time (its step time minus waiting)."""
    from parallel.distributed import all_reduce_sum

    for g, lr in zip(executor.param_groups, lrs):
        g["lr"] = lr
    executor.schedule, out = "v", []
    for i in range(a.train_steps):
        mbs = step_of(gen, 4, dp, a.micro_batch_bytes)
        step = equiv_worker.Step(mbs[executor.dp_rank::dp], global_targets=sum(x.n_targets for x in mbs),
                                 global_bytes=sum(x.n_bytes for x in mbs))
        step = next(executor.batches([step])) if executor.reads_data else next(executor.batches(None))
        t0 = time.perf_counter()
        res = executor.train_step(step)
        dt = time.perf_counter() - t0
        busy = dt * (1 - res.extra_metrics[f"perf/bubble/rank{executor.me}"])
        per_rank = all_reduce_sum([busy if executor.me == s and executor.dp_rank == 0 else 0.0
                                   for s in range(a.pp)])
        out.append({"step": i + 1, "loss": res.loss, "compression": res.compression, "compute_s_per_rank": per_rank})
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--config", default="small")
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--schedules", default="v,1f1b,gpipe")
    ap.add_argument("--micro-batches", default="1,2,4,8,16")
    ap.add_argument("--micro-batch-bytes", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--keep-gathered", action="store_true")
    ap.add_argument("--train-steps", type=int, default=0)
    a = ap.parse_args()

    from deepspeed import comm

    from parallel.build import build_executor
    from parallel.distributed import all_reduce_sum, init_process_group, setup_env
    from parallel.engine import resolve_ds_config
    from pretrain.config import load_config
    from pretrain.model import HNetConfig

    overrides = ["train.engine=deepspeed", f"parallel.pipeline_stages={a.pp}",
                 f"parallel.keep_params_gathered={str(a.keep_gathered).lower()}",
                 "train.ds_overrides={comms_logger: {enabled: true, prof_all: true, verbose: false}}"]
    cfg = load_config(str(REPO / "pretrain" / "configs" / f"{a.config}.yaml"), overrides, validate=False)
    info = setup_env()
    model_cfg = HNetConfig.from_dict(cfg.model_dict())
    dp = info.world_size // a.pp
    init_process_group(info, use_deepspeed=True)
    executor, _, _ = build_executor(cfg, info, model_cfg, resolve_ds_config(cfg, dp))
    gen = torch.Generator().manual_seed(0)
    lrs = [g["lr"] for g in executor.param_groups]
    for g in executor.param_groups:
        g["lr"] = 0.0  # the schedules are compared on one model: no update moves its chunking
    results = []
    for schedule in a.schedules.split(","):
        executor.schedule = schedule
        for m in map(int, a.micro_batches.split(",")):
            times, bubbles, theory, sent, gathered, compute = [], [], 0.0, 0.0, [], []
            for k in range(1 + a.steps):
                mbs = step_of(gen, m, dp, a.micro_batch_bytes)
                step = equiv_worker.Step(mbs[executor.dp_rank::dp], global_targets=sum(x.n_targets for x in mbs),
                                         global_bytes=sum(x.n_bytes for x in mbs))
                step = next(executor.batches([step])) if executor.reads_data else next(executor.batches(None))
                comm.comms_logger.comms_dict.clear()
                t0 = time.perf_counter()
                res = executor.train_step(step)
                dt = time.perf_counter() - t0
                if k == 0:
                    continue  # warm-up
                times.append(dt)
                bubbles.append([res.extra_metrics[f"perf/bubble/rank{r}"] for r in range(a.pp)])
                theory = res.extra_metrics["perf/bubble_theory"]
                sent = res.extra_metrics["perf/pipeline_bytes_sent"]
                gathered.append(all_gather_bytes())
                ops = comm_ops()
                compute.append(dt * (1 - bubbles[-1][executor.me]))
            busy = all_reduce_sum([statistics.median(compute) if executor.me == s and executor.dp_rank == 0 else 0.0
                                   for s in range(a.pp)])
            ag = all_reduce_sum([statistics.median(gathered) if executor.me == s and executor.dp_rank == 0 else 0.0
                                 for s in range(a.pp)])
            results.append({"schedule": schedule, "micro_batches": m, "step_s": statistics.median(times),
                            "bubble_measured": [statistics.mean(b[r] for b in bubbles) for r in range(a.pp)],
                            "bubble_theory": theory, "pipeline_bytes_sent": sent,
                            "all_gather_bytes_per_rank": ag, "compute_s_per_rank": busy,
                            "comm_ops_rank0": ops if info.rank == 0 else None})
            if info.rank == 0:
                print(json.dumps(results[-1]), flush=True)
    training = train_phase(executor, a, dp, gen, lrs)
    if info.rank == 0:
        Path(a.out).write_text(json.dumps({"pp": a.pp, "dp": dp, "config": a.config, "keep_gathered": a.keep_gathered,
                                           "micro_batch_bytes": a.micro_batch_bytes, "results": results,
                                           "training": training}, indent=1))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
