"""Trainer benchmarks -> bench-results/trainer.json

1. Step time of the small config (pretrain/configs/small.yaml) on the demo shards:
   2 processes ZeRO-3 vs 1 process plain PyTorch over the same global steps (ratio).
2. Share of step time in data loading and tracking, and of wall time in checkpointing (ZeRO-3 run).
3. Peak resident memory per rank (getrusage of each process) for ZeRO-1, ZeRO-2, ZeRO-3 and
   ZeRO-3 offload on the same model.

    .venv/bin/python tests/bench/bench_trainer.py [--steps 12]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))

from trainer_harness import PY, base_env, read_log, run_ranks, train_argv  # noqa: E402

# A benchmark times what a user's launch costs: every rank a real interpreter (no forkserver).
os.environ.setdefault("HNET_TEST_NO_FORKSERVER", "1")

SMALL = str(REPO / "pretrain" / "configs" / "small.yaml")
WARMUP = 3  # first steps excluded from the step-time average (allocations, first gathers)
# Memory comparison: a wider model (~30M parameters) on short rows, so parameters, gradients and
# Adam state (what ZeRO partitions) dominate the activations.
MEM_MODEL = ["model.d_model=[512,768]", "model.d_intermediate=[0,2048]", "model.attn_cfg.num_heads=[8,8]",
             "model.attn_cfg.rotary_emb_dim=[32,48]", "data.micro_batch_bytes=512", "data.step_bytes=2048"]


def ensure_shards() -> tuple[str, str]:
    idx = REPO / "demo-data" / "train" / "index.json"
    if not idx.is_file():
        subprocess.run([PY, "-m", "data_pipeline.shard", "--demo", str(REPO / "demo-data")], cwd=REPO, check=True,
                       env=base_env())
    return str(idx), str(REPO / "demo-data" / "val" / "index.json")


def run(name: str, world: int, steps: int, work: Path, shards, *extra: str) -> dict:
    run_dir = work / name
    logs = work / f"{name}_logs"
    logs.mkdir(parents=True)
    args = [f"run_dir={run_dir}", f"data.train_index=[{shards[0]}]", "data.eval_index=[]", f"train.steps={steps}",
            "train.log_every=1000", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.flush_every=50",
            *extra]
    t0 = time.perf_counter()
    run_ranks(train_argv(*args, config=SMALL), world, work, log_dir=logs, timeout=900)
    wall = time.perf_counter() - t0
    summary = json.loads((run_dir / "summary.json").read_text())
    times = [r["step_time_s"] for r in read_log(run_dir) if "step_time_s" in r][WARMUP:]
    summary["step_time_s_steady"] = sum(times) / max(1, len(times))
    summary["launch_wall_s"] = wall
    print(f"{name}: {summary['step_time_s_steady']:.3f} s/step (steady), peak RSS per rank "
          f"{[round(m) for m in summary['peak_rss_mib_per_rank']]} MiB over the process, "
          f"{summary['train_peak_rss_mib_per_rank']} MiB during training", flush=True)
    return summary


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--memory-only", action="store_true")
    a = ap.parse_args()
    shards = ensure_shards()
    work = Path(tempfile.mkdtemp(prefix="bench_trainer_"))
    out = REPO / "bench-results" / "trainer.json"
    res: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "steps": a.steps,
                 "config": "pretrain/configs/small.yaml"}
    if a.memory_only and out.is_file():
        res = json.loads(out.read_text())  # keep the step-time figures of the last full run
    try:
        if not a.memory_only:
            step_times(res, a.steps, work, shards)
        memory(res, work, shards)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


def step_times(res: dict, steps: int, work: Path, shards) -> None:
    plain = run("plain_1proc", 1, steps, work, shards, "train.engine=plain", "checkpoint.every=0")
    zero3 = run("zero3_2proc", 2, steps, work, shards, "train.ds_config=ds_configs/zero3.json",
                f"checkpoint.every={max(1, steps // 3)}")
    res["step_time"] = {
        "plain_1proc_s": plain["step_time_s_steady"], "zero3_2proc_s": zero3["step_time_s_steady"],
        "ratio_zero3_2proc_over_plain_1proc": zero3["step_time_s_steady"] / plain["step_time_s_steady"],
        "note": "same global step (step_bytes) in both; 2 processes share 2 cores with everything else",
    }
    res["shares_zero3_2proc"] = {
        "data_loading_of_step_time": zero3["data_share"],
        "tracking_of_step_time": zero3["tracking_share"],
        "tracking_setup_s_once": zero3["tracking_setup_s"],
        "checkpointing_of_wall_time": zero3["ckpt_share"],
        "checkpoint_s_total": zero3["ckpt_s"], "checkpoints": steps // max(1, steps // 3),
    }
    res["peak_rss_mib_per_rank_small_config"] = {"plain_1proc": plain["peak_rss_mib_per_rank"],
                                                 "zero3_2proc": zero3["peak_rss_mib_per_rank"]}


def memory(res: dict, work: Path, shards) -> None:
    mem = {}
    s = run("mem_plain_1proc", 1, 4, work, shards, "train.engine=plain", "checkpoint.every=0", *MEM_MODEL)
    mem["plain_1proc"] = {"process": s["peak_rss_mib_per_rank"], "training": s["train_peak_rss_mib_per_rank"]}
    for name in ("zero1", "zero2", "zero3", "zero3_offload"):
        s = run(f"mem_{name}_2proc", 2, 4, work, shards, f"train.ds_config=ds_configs/{name}.json",
                "checkpoint.every=0", "train.ds_overrides={zero_optimization: {stage3_param_persistence_threshold: 0}}"
                if name.startswith("zero3") else "train.log_every=1000", *MEM_MODEL)
        mem[f"{name}_2proc"] = {"process": s["peak_rss_mib_per_rank"], "training": s["train_peak_rss_mib_per_rank"]}
    from pretrain.config import load_config
    from pretrain.model import HNetConfig, num_parameters

    mcfg = HNetConfig.from_dict(load_config(SMALL, MEM_MODEL, validate=False).model_dict())
    res["peak_rss_mib_per_rank"] = mem
    res["peak_rss_model"] = {"overrides": MEM_MODEL, "parameters": num_parameters(mcfg),
                             "fp32_params_grads_adam_mib": num_parameters(mcfg) * 16 / 2 ** 20}
    res["peak_rss_note"] = ("read by each rank process itself: 'process' = ru_maxrss over the whole life (includes "
                            "building the full model on every rank before ZeRO partitions it); 'training' = VmHWM "
                            "after resetting it (/proc/self/clear_refs) once the engine is built, i.e. the peak "
                            "of the training steps. Both include the torch/DeepSpeed/MLflow runtime and activations")


if __name__ == "__main__":
    main()
