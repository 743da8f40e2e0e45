"""End-to-end runs of `python -m pretrain.train` on 2 CPU processes with ZeRO-3 over gloo.

One straight 30-step run serves several contracts (loss falls, MLflow metric names, retention),
one interrupted run serves exact resume and crash-during-save, and a 1-rank continuation of the
straight run serves resharding and the NaN guard. Every launch is bounded by a timeout.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from trainer_harness import PY, REPO, Ranks, base_env, read_log, run_ranks, train_argv, train_losses

pytestmark = pytest.mark.slow

STEPS = 30
EXPECTED_METRICS = {
    "train/loss", "train/bpb", "train/ratio_loss", "train/compression/stage0", "train/boundary_fraction/stage0",
    "train/lr", "train/grad_norm", "perf/bytes_per_s", "perf/step_time_s", "data/packing_efficiency",
    "data/imbalance", "eval/bpb", "eval/compression/stage0", "train/bytes_seen",
}


def common(run_dir: Path, shards: dict, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.train_index=[{shards['train']}]", f"data.eval_index=[{shards['val']}]",
            f"train.steps={STEPS}", "checkpoint.every=6", "checkpoint.keep_last=2", "train.log_every=5",
            f"tracking.uri=sqlite:///{run_dir.parent / 'mlflow.db'}", "debug.log_keys=true", *extra]


def consolidated(run_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = run_dir / "checkpoints"
    tag = (root / "latest").read_text().strip()
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)


def mlflow_client(run_dir: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, demo_shards) -> Path:
    base = tmp_path_factory.mktemp("straight")
    run_dir = base / "run"
    run_ranks(train_argv(*common(run_dir, demo_shards)), 2, base, log_dir=base, timeout=300)
    return run_dir


def processes_mentioning(text: str) -> list[int]:
    """Live (not zombie) processes whose command line contains `text`."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "status").read_text()
        except OSError:
            continue
        if text in cmd and "\nState:\tZ" not in state:
            out.append(int(d.name))
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, demo_shards) -> dict:
    """6 steps, SIGKILL of every process; restart that dies while saving step 12; restart to 30.

    With one data worker process per rank, which reads the same single stream per rank as the
    straight run's in-process reader: the same batches, through the worker transport, across kills."""
    base = tmp_path_factory.mktemp("interrupted")
    run_dir = base / "run"
    latest = run_dir / "checkpoints" / "latest"
    assert not processes_mentioning("hnet-data-worker"), "data workers of an earlier test still run"

    def args(*extra):  # the straight run's arguments plus the data workers
        return common(run_dir, demo_shards, "data.num_workers=1", *extra)

    # 1) Run until the step-6 checkpoint is written, then SIGKILL both ranks.
    logs1 = base / "launch1"
    logs1.mkdir()
    ranks = Ranks(train_argv(*args("debug.hang_at_step=6")), 2, base, log_dir=logs1)
    deadline = time.time() + 240
    while time.time() < deadline:
        if latest.is_file() and latest.read_text().strip() == "step00000006" and \
                "hanging after step 6" in (logs1 / "rank0.log").read_text(errors="replace"):
            break
        if any(p.poll() is not None for p in ranks.procs):
            break
        time.sleep(0.5)
    alive = [p.poll() is None for p in ranks.procs]
    ranks.kill()
    assert all(alive), f"a rank ended before it could be killed:\n{ranks.output()}"
    assert latest.read_text().strip() == "step00000006"

    # 2) Restart; rank 1 dies in the middle of saving step 12 (after writing its shard files).
    logs2 = base / "launch2"
    logs2.mkdir()
    ranks = Ranks(train_argv(*args("debug.crash_in_save_at_step=12", "debug.crash_rank=1")),
                  2, base, log_dir=logs2)
    try:
        assert ranks.procs[1].wait(timeout=240) == 17, ranks.output()
        time.sleep(2)
    finally:
        ranks.kill()  # rank 0 waits in the barrier for a peer that is gone
    launch2_out = ranks.output()

    # 3) Restart and finish.
    logs3 = base / "launch3"
    logs3.mkdir()
    run_ranks(train_argv(*args()), 2, base, log_dir=logs3, timeout=300)
    deadline = time.time() + 10
    while processes_mentioning("hnet-data-worker") and time.time() < deadline:
        time.sleep(0.2)
    assert not processes_mentioning("hnet-data-worker"), "data workers outlived the killed launches"
    return {"run_dir": run_dir, "launch2": launch2_out, "launch3": (logs3 / "rank0.log").read_text()}


# ----------------------------------------------------------------------------- straight run
def test_loss_decreases_and_params_sharded_over_30_steps(straight):
    losses = train_losses(straight)
    assert sorted(losses) == list(range(1, STEPS + 1))
    first, last = sum(losses[s] for s in range(1, 6)) / 5, sum(losses[s] for s in range(26, 31)) / 5
    assert last < first - 0.5, f"loss did not fall: first 5 steps {first:.3f}, last 5 {last:.3f}"
    # Both ranks wrote their own ZeRO-3 shard of parameters and optimizer state.
    tag = straight / "checkpoints" / "step00000030"
    for r in (0, 1):
        assert (tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt").is_file()
    sizes = []
    for r in (0, 1):
        sd = torch.load(tag / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt", map_location="cpu", weights_only=False)
        flat = sd["optimizer_state_dict"]["fp32_flat_groups"]
        sizes.append(sum(t.numel() for t in flat))
    n_params = sum(t.numel() for t in consolidated(straight).values())
    assert abs(sizes[0] - n_params / 2) < 0.01 * n_params, f"rank shards {sizes} vs {n_params} parameters"


def test_retention_and_latest(straight):
    root = straight / "checkpoints"
    assert (root / "latest").read_text().strip() == "step00000030"
    tags = sorted(p.name for p in root.iterdir() if p.name.startswith("step"))
    assert tags == ["step00000024", "step00000030"], tags  # keep_last=2
    meta = json.loads((root / "step00000030" / "meta.json").read_text())
    assert meta["step"] == 30 and meta["world_size"] == 2 and meta["model"]["d_model"] == [32, 48]
    assert (root / "step00000030" / "config.yaml").is_file()


def test_mlflow_metrics_params_artifacts(straight):
    summary = json.loads((straight / "summary.json").read_text())
    client = mlflow_client(straight)
    run = client.get_run(summary["mlflow_run_id"])
    assert EXPECTED_METRICS <= set(run.data.metrics), sorted(EXPECTED_METRICS - set(run.data.metrics))
    assert "perf/mfu" not in run.data.metrics  # CPU: no MFU
    hist = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in hist) == list(range(1, STEPS + 1))
    losses = train_losses(straight)
    assert all(math.isclose(m.value, losses[m.step], rel_tol=1e-6) for m in hist)
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/bpb")] == [STEPS]
    params = run.data.params
    assert params["world_size"] == "2" and params["config.train.steps"] == str(STEPS)
    assert params["ds.zero_optimization.stage"] == "3" and "git_commit" in params and "versions.deepspeed" in params
    assert run.data.tags["restart_count"] == "0"
    assert run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "ds_config.json"} <= artifacts


# ----------------------------------------------------------------------------- resume
def test_exact_resume_after_sigkill_and_crash_during_save(straight, interrupted):
    run_dir = interrupted["run_dir"]
    assert "dies in the middle of saving step 12" in interrupted["launch2"]
    assert "resuming from checkpoint" in interrupted["launch3"] and "at step 6" in interrupted["launch3"], \
        "the crash during the step-12 save must leave `latest` on step 6"
    a, b = train_losses(straight), train_losses(run_dir)
    for step in range(7, STEPS + 1):
        assert a[step] == b[step], f"step {step}: straight {a[step]!r} vs resumed {b[step]!r}"
    pa, pb = consolidated(straight), consolidated(run_dir)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), f"{k} differs after resume"


def test_resumed_run_continues_same_mlflow_run(interrupted):
    run_dir = interrupted["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    client = mlflow_client(run_dir)
    runs = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert len(runs) == 1, "a restart must continue the run, not open a new one"
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["restart_count"] == "2"
    assert run.data.tags["restart_1.from_step"] == run.data.tags["restart_2.from_step"] == "6"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert {m.step for m in history} == set(range(1, STEPS + 1))
    # per step, the newest value is the resumed run's (steps re-logged after a kill included)
    newest = {}
    for m in sorted(history, key=lambda m: m.timestamp):
        newest[m.step] = m.value
    losses = train_losses(run_dir)
    assert all(newest[s] == losses[s] for s in range(7, STEPS + 1))


# ----------------------------------------------------------------------------- reshard + NaN guard
def test_reshard_two_ranks_to_one_and_nan_guard(straight, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    shutil.copy(straight.parent / "mlflow.db", tmp_path / "mlflow.db")  # the run id lives in the store
    res = subprocess.run([PY, "-m", "pretrain.reshard", str(run_dir)], cwd=tmp_path, env=base_env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert (run_dir / "checkpoints" / "step00000030_universal" / "zero").is_dir()

    cfg = json.loads((straight / "summary.json").read_text())
    argv = train_argv(f"run_dir={run_dir}", *[a for a in common(run_dir, {"train": _idx(straight, "train"),
                                                                          "val": _idx(straight, "val")})
                                              if not a.startswith(("run_dir", "train.steps"))],
                      "train.steps=34", "debug.nan_at_steps=[32]", "train.max_bad_steps=2")
    run_ranks(argv, 1, tmp_path, log_dir=tmp_path, timeout=240)
    out = (tmp_path / "rank0.log").read_text()
    assert "written by 2 ranks, now 1" in out
    log = [r for r in read_log(run_dir) if "loss" in r]
    new = {r["step"]: r for r in log if r["step"] > 30}
    assert sorted(new) == [31, 32, 33, 34]
    assert new[32]["skipped"] and "non-finite loss or gradient" in out
    assert all(math.isfinite(new[s]["loss"]) and not new[s]["skipped"] for s in (31, 33, 34))
    # The model continued from step 30, it did not restart from scratch.
    first = train_losses(straight)[1]
    assert new[31]["loss"] < first - 0.5
    # Data continues: nothing read in steps 1-30 comes back, except documents split across the step boundary.
    old = set().union(*[set(r["keys"]) for r in log if r["step"] <= 30])
    recent = set().union(*[set(r["keys"]) for r in log if 27 <= r["step"] <= 30])
    for s in (31, 32, 33, 34):
        repeated = set(new[s]["keys"]) & old
        assert repeated <= recent, f"step {s} repeats documents {sorted(repeated - recent)[:5]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mlflow_run_id"] == cfg["mlflow_run_id"]

    # Back to 2 ranks, converted by the trainer itself (checkpoint.auto_reshard): rank 0 converts
    # the 1-rank checkpoint while rank 1 waits for it on the file system.
    logs = tmp_path / "two"
    logs.mkdir()
    argv = [a for a in argv if not a.startswith(("train.steps", "debug.nan_at_steps"))] + ["train.steps=36"]
    run_ranks(argv, 2, tmp_path, log_dir=logs, timeout=300)
    out = (logs / "rank0.log").read_text()
    assert "converting checkpoint step00000034 (written by 1 ranks)" in out and "written by 1 ranks, now 2" in out
    assert (run_dir / "checkpoints" / "step00000034_universal" / "zero").is_dir()
    new = {r["step"]: r for r in read_log(run_dir) if "loss" in r and r["step"] > 34}
    assert sorted(new) == [35, 36] and all(math.isfinite(r["loss"]) for r in new.values())


def test_conversion_survives_job_signals(straight, tmp_path):
    """SLURM signals every process of the step (SIGUSR1 with --full, SIGTERM on preemption); the
    trainer answers with a checkpoint once the conversion is done, so ds_to_universal, a child
    process, must not die of them. Signals go to this process's children throughout."""
    import os
    import signal
    import threading

    from pretrain.reshard import convert_to_universal

    root = tmp_path / "checkpoints"
    shutil.copytree(straight / "checkpoints", root)
    tag = (root / "latest").read_text().strip()
    done, hits = threading.Event(), []

    me = str(os.getpid())

    def children() -> set[str]:
        out = set()
        for d in Path("/proc").iterdir():
            try:
                if d.name.isdigit() and (d / "stat").read_text().rsplit(")", 1)[1].split()[1] == me:
                    out.add(d.name)
            except (OSError, IndexError):
                pass
        return out

    before = children()  # helpers of the test session (the rank forkserver): not the converter's

    def signal_children():
        while not done.is_set():
            for pid in children() - before:
                try:
                    for sig in (signal.SIGUSR1, signal.SIGTERM):
                        os.kill(int(pid), sig)
                    hits.append(pid)
                except OSError:
                    pass
            time.sleep(0.05)

    th = threading.Thread(target=signal_children)
    th.start()
    try:
        out = convert_to_universal(str(root), tag)
    finally:
        done.set()
        th.join()
    assert hits, "the converter child was never signalled"
    assert os.path.isdir(os.path.join(out, "zero"))
    assert not [p for p in os.listdir(root) if p.startswith(".tmp_")]  # no temporary copy left behind


def _idx(run_dir: Path, split: str) -> str:
    import yaml

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return cfg["data"]["train_index" if split == "train" else "eval_index"][0]


def test_export_consolidated_public_state_dict(straight, tmp_path):
    out = tmp_path / "export"
    res = subprocess.run([PY, "-m", "pretrain.export", str(straight), str(out)], cwd=tmp_path, env=base_env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    from pretrain.model import HNetConfig, HNetForCausalLM, load_public_checkpoint

    model = load_public_checkpoint(out / "model.pt")  # strict=True, config.json beside it
    ref = consolidated(straight)
    for name, p in model.state_dict().items():
        assert torch.equal(p, ref[name].float()), name
    config = HNetConfig.from_json(out / "config.json")
    assert config.d_model == [32, 48] and config.ratio_targets == [4.0]
    fresh = HNetForCausalLM(config)
    fresh.load_state_dict(torch.load(out / "model.pt", weights_only=True), strict=True)


def test_sample_from_a_zero3_run_directory(straight, tmp_path):
    """pretrain.sample consolidates the ZeRO-3 shards on the fly; greedy output equals the one
    from the exported state dict of the same checkpoint."""
    def sample(ckpt: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "pretrain.sample", str(ckpt), "--prompt", "The ", "ab",
                               "--max-bytes", "24", "--temperature", "0", "--no-eos", *extra], cwd=tmp_path,
                              env=base_env(), capture_output=True, text=True, timeout=180)

    res = sample(straight, "--show-boundaries", "--html", str(tmp_path / "b.html"), "--jsonl", str(tmp_path / "o.jsonl"))
    assert res.returncode == 0, res.stdout + res.stderr
    rows = [json.loads(line) for line in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["n_bytes"] for r in rows] == [24, 24] and all(r["stop_reason"] == "max_bytes" for r in rows)
    assert "bytes/s" in res.stderr and "data-b0" in (tmp_path / "b.html").read_text()
    exp = subprocess.run([PY, "-m", "pretrain.export", str(straight), str(tmp_path / "export")], cwd=tmp_path,
                         env=base_env(), capture_output=True, text=True, timeout=180)
    assert exp.returncode == 0, exp.stderr
    res2 = sample(tmp_path / "export" / "model.pt", "--jsonl", str(tmp_path / "o2.jsonl"))
    assert res2.returncode == 0, res2.stderr
    rows2 = [json.loads(line) for line in (tmp_path / "o2.jsonl").read_text().splitlines()]
    assert [r["output_hex"] for r in rows2] == [r["output_hex"] for r in rows]
    bad = sample(tmp_path / "nowhere")
    assert bad.returncode == 2 and "no checkpoint at" in bad.stderr


def test_kernel_choice_logged_and_tracked(straight):
    run = mlflow_client(straight).get_run(json.loads((straight / "summary.json").read_text())["mlflow_run_id"])
    for name in ("mamba_ssm", "causal_conv1d", "flash_attn"):
        assert run.data.params[f"kernels.{name}"].startswith("inactive: tensors on cpu"), run.data.params
    assert "kernel mamba_ssm: inactive" in (straight.parent / "rank0.log").read_text()
