"""Preemption: a signal to one rank makes every rank checkpoint at the same step and return
"preempted"; a STOP file in the run directory stops the run for good at the next step."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from trainer_harness import Ranks, read_log, run_ranks, train_argv

pytestmark = pytest.mark.slow


def test_signal_checkpoints_on_all_ranks_then_stop_file(tmp_path, demo_shards):
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", f"data.train_index=[{demo_shards['train']}]", "train.steps=500",
            "checkpoint.every=0", "tracking.enabled=false", "train.log_every=1",
            "train.activation_checkpointing=true", "data.round_to=64"]
    ranks = Ranks(train_argv(*args), 2, tmp_path, log_dir=tmp_path)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            log = run_dir / "train_log.jsonl"
            if log.is_file() and len(log.read_text().splitlines()) >= 3:
                break
            assert all(p.poll() is None for p in ranks.procs), ranks.output()
            time.sleep(0.3)
        os.kill(ranks.procs[1].pid, signal.SIGUSR1)  # only rank 1 is told
        codes = ranks.wait(120)
    finally:
        ranks.kill()
    assert codes == [0, 0], ranks.output()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "preempted", ranks.output()
    last = max(r["step"] for r in read_log(run_dir))
    assert summary["step"] == last < 500, (summary, ranks.output())
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{last:08d}"

    (run_dir / "STOP").write_text("")
    _, out = run_ranks(train_argv(*args), 2, tmp_path, log_dir=tmp_path, timeout=180)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["step"] == last + 1, (summary, out)
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step{last + 1:08d}"


def test_a_stop_at_the_final_step_checkpoints_first_and_the_next_launch_evaluates(tmp_path, demo_shards):
    # A signal or STOP at the final step saves before the (possibly long) final evaluation; that
    # evaluation is then owed, and the next launch of the run does it instead of "nothing to do".
    run_dir = tmp_path / "run"
    args = [f"run_dir={run_dir}", f"data.train_index=[{demo_shards['train']}]",
            f"data.eval_index=[{demo_shards['val']}]", "train.eval_max_steps=2", "train.steps=2",
            "checkpoint.every=0", "tracking.enabled=false", "train.log_every=1"]
    run_dir.mkdir()
    _, out = run_ranks(train_argv(*args), 1, tmp_path, log_dir=tmp_path, timeout=180)  # steps 1-2
    (run_dir / "STOP").write_text("")
    _, out = run_ranks(train_argv(*args, "train.steps=3"), 1, tmp_path, log_dir=tmp_path, timeout=180)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["step"] == 3, (summary, out)
    assert "step 3: evaluation skipped, STOP came first; the next launch of this run does it" in out, out
    assert not [r for r in read_log(run_dir) if r["step"] == 3 and "eval/bpb" in r]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step00000003"

    (run_dir / "STOP").unlink()
    _, out = run_ranks(train_argv(*args, "train.steps=3"), 1, tmp_path, log_dir=tmp_path, timeout=180)
    assert "the final evaluation the last attempt left for a signal" in out, out
    evals = [r for r in read_log(run_dir) if r["step"] == 3 and "eval/bpb" in r]
    assert len(evals) == 1 and evals[0]["eval/bpb"] > 0, read_log(run_dir)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    _, out = run_ranks(train_argv(*args, "train.steps=3"), 1, tmp_path, log_dir=tmp_path, timeout=180)
    assert "nothing to do" in out and len([r for r in read_log(run_dir) if "eval/bpb" in r and r["step"] == 3]) == 1


def test_a_stop_at_the_final_step_with_nothing_owed_completes(tmp_path, demo_shards):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").write_text("")
    args = [f"run_dir={run_dir}", f"data.train_index=[{demo_shards['train']}]", "train.steps=1",
            "checkpoint.every=0", "tracking.enabled=false"]
    _, out = run_ranks(train_argv(*args), 1, tmp_path, log_dir=tmp_path, timeout=180)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 1, (summary, out)
