"""`python -m pretrain.train` with the hierarchy over 2 pipeline ranks x 2 data-parallel ranks
(4 processes, gloo): what the trainer offers keeps working with parallel.pipeline_stages > 1.

One straight 12-step run, one run SIGKILLed after its step-4 checkpoint and resumed (bitwise
equal to the straight one, exported weights included), and a continuation of the straight run
on 2 ranks (the same pipeline, data-parallel size 1: the checkpoint is converted) through a NaN
step. Every launch is bounded by a timeout; killed launches are ended process by process.
"""
from __future__ import annotations

import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from trainer_harness import PY, Ranks, base_env, kill_when_hanging, read_log, run_ranks, train_argv, train_losses

pytestmark = pytest.mark.slow

STEPS, WORLD = 12, 4


def common(run_dir: Path, shards: dict, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.train_index=[{shards['train']}]", f"data.eval_index=[{shards['val']}]",
            f"train.steps={STEPS}", "checkpoint.every=4", "checkpoint.keep_last=2", "train.log_every=2",
            "train.eval_every=6", f"tracking.uri=sqlite:///{run_dir.parent / 'mlflow.db'}",
            "parallel.pipeline_stages=2", *extra]


def exported(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    res = subprocess.run([PY, "-m", "pretrain.export", str(run_dir), str(out)], cwd=run_dir.parent, env=base_env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return torch.load(out / "model.pt", weights_only=True)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, pipe_shards) -> Path:
    base = tmp_path_factory.mktemp("pipe_straight")
    run_dir = base / "run"
    run_ranks(train_argv(*common(run_dir, pipe_shards)), WORLD, base, log_dir=base, timeout=400)
    return run_dir


@pytest.fixture(scope="module")
def straight_export(straight, tmp_path_factory) -> Path:
    """The straight run's weights, exported once for the tests that read them."""
    out = tmp_path_factory.mktemp("pipe_straight_export")
    exported(straight, out)
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, pipe_shards) -> Path:
    base = tmp_path_factory.mktemp("pipe_interrupted")
    run_dir = base / "run"
    latest = run_dir / "checkpoints" / "latest"
    logs1 = base / "launch1"
    logs1.mkdir()
    ranks = Ranks(train_argv(*common(run_dir, pipe_shards, "debug.hang_at_step=4")), WORLD, base, log_dir=logs1)
    kill_when_hanging(ranks, 4)
    assert latest.read_text().strip() == "step00000004"
    logs2 = base / "launch2"
    logs2.mkdir()
    run_ranks(train_argv(*common(run_dir, pipe_shards)), WORLD, base, log_dir=logs2, timeout=400)
    out = (logs2 / "rank0.log").read_text()
    assert "resuming from checkpoint" in out and "at step 4" in out, out[-3000:]
    return run_dir


def test_pipeline_trains_and_tracks(straight):
    losses = train_losses(straight)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 1.0, f"the loss did not fall: {losses}"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{straight.parent / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("tests").experiment_id])[0]
    metrics = set(run.data.metrics)
    for name in ("train/loss", "train/compression/stage0", "train/ratio_loss", "train/grad_norm", "eval/bpb",
                 "eval/compression/stage0", "perf/bubble/rank0", "perf/bubble/rank1", "perf/bubble_theory",
                 "perf/pipeline_bytes_sent"):
        assert name in metrics, f"{name} not tracked; got {sorted(metrics)}"
    for k in (0, 1):
        assert 0.0 <= run.data.metrics[f"perf/bubble/rank{k}"] < 1.0
    assert 1.0 < run.data.metrics["eval/compression/stage0"] < 50.0
    assert run.data.params["config.parallel.pipeline_stages"] == "2"
    for stage in (0, 1):  # each pipeline stage saved its own ZeRO-3 shards
        assert (straight / "checkpoints" / f"step{STEPS:08d}" / f"pipe{stage}").is_dir()


def test_exact_resume_after_sigkill(straight, straight_export, interrupted, tmp_path):
    a, b = train_losses(straight), train_losses(interrupted)
    for step in range(5, STEPS + 1):
        assert a[step] == b[step], f"step {step}: straight {a[step]!r} vs resumed {b[step]!r}"
    wa = torch.load(straight_export / "model.pt", weights_only=True)
    wb = exported(interrupted, tmp_path / "b")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs after resume"


def test_export_loads_into_the_public_model(straight_export):
    from pretrain.model import load_public_checkpoint

    weights = torch.load(straight_export / "model.pt", weights_only=True)
    model = load_public_checkpoint(straight_export / "model.pt")  # strict: every parameter, both stages
    assert set(model.state_dict()) == set(weights)


def test_resume_at_another_data_parallel_size_through_a_nan_step(straight, tmp_path, pipe_shards):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    shutil.copy(straight.parent / "mlflow.db", tmp_path / "mlflow.db")
    argv = train_argv(*[a for a in common(run_dir, pipe_shards) if not a.startswith("train.steps")],
                      "train.steps=16", "debug.nan_at_steps=[14]", "train.max_bad_steps=2")
    run_ranks(argv, 2, tmp_path, log_dir=tmp_path, timeout=400)
    out = (tmp_path / "rank0.log").read_text()
    assert "written by 4 ranks, now 2" in out, out[-3000:]
    new = {r["step"]: r for r in read_log(run_dir) if "loss" in r and r["step"] > STEPS}
    assert sorted(new) == [13, 14, 15, 16]
    assert new[14]["skipped"] and "non-finite loss or gradient" in out
    assert all(math.isfinite(new[s]["loss"]) and not new[s]["skipped"] for s in (13, 15, 16))
    assert new[13]["loss"] < train_losses(straight)[1] - 1.0, "the model did not continue from step 12"


def test_another_pipeline_layout_is_refused(straight, tmp_path, pipe_shards):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    argv = train_argv(*[a for a in common(run_dir, pipe_shards) if not a.startswith("parallel.")],
                      "train.steps=16")
    env = base_env({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": "1"})
    res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "pipeline" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_sample_from_a_pipelined_checkpoint(straight, straight_export, tmp_path):
    """pretrain.sample consolidates every stage's shards; the result equals the exported model's."""
    import json

    def sample(ckpt: Path, out: Path) -> list[dict]:
        res = subprocess.run([PY, "-m", "pretrain.sample", str(ckpt), "--prompt", "Once ", "--max-bytes", "16",
                              "--temperature", "0", "--no-eos", "--jsonl", str(out)], cwd=tmp_path, env=base_env(),
                             capture_output=True, text=True, timeout=180)
        assert res.returncode == 0, res.stdout + res.stderr
        return [json.loads(line) for line in out.read_text().splitlines()]

    assert sample(straight, tmp_path / "a.jsonl") == sample(straight_export / "model.pt", tmp_path / "b.jsonl")


def test_signal_to_a_deep_rank_checkpoints_every_stage(tmp_path, pipe_shards):
    """SIGUSR1 to one rank of the last pipeline stage: all four ranks save the same step (both
    stages' shards) and leave "preempted"; a restart resumes from it."""
    import json
    import os
    import signal

    run_dir = tmp_path / "run"
    argv = train_argv(*[a for a in common(run_dir, pipe_shards) if not a.startswith(("train.steps", "checkpoint."))],
                      "train.steps=500", "checkpoint.every=0", "tracking.enabled=false")
    ranks = Ranks(argv, WORLD, tmp_path, log_dir=tmp_path)
    try:
        deadline = time.time() + 240
        log = run_dir / "train_log.jsonl"
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
            assert all(p.poll() is None for p in ranks.procs), ranks.output()
            time.sleep(0.3)
        os.kill(ranks.procs[3].pid, signal.SIGUSR1)  # stage 1, replica 1
        codes = ranks.wait(180)
    finally:
        ranks.kill()
    assert codes == [0] * WORLD, ranks.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["step"] < 500
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert tag == f"step{summary['step']:08d}"
    for stage in (0, 1):
        assert (run_dir / "checkpoints" / tag / f"pipe{stage}").is_dir()
