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
