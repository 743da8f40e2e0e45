"""Auto-reshard at start: rank 0 converts, the other ranks wait on the file system, not in a
collective (a big model's conversion can outlast the collective timeout)."""
from __future__ import annotations

import os
import threading
import time

import pytest

from pretrain.reshard import convert_on_rank0


def _wait_in_thread(root, attempt, timeout_s):
    out = {}

    def run():
        t0 = time.monotonic()
        try:
            convert_on_rank0(str(root), "step00000006", 1, attempt, timeout_s, poll_s=0.05)
            out["ok"] = True
        except RuntimeError as e:
            out["error"] = str(e)
        out["s"] = time.monotonic() - t0

    th = threading.Thread(target=run)
    th.start()
    return th, out


def test_waiting_rank_returns_when_the_universal_copy_appears(tmp_path):
    th, out = _wait_in_thread(tmp_path, "a1", timeout_s=30)
    time.sleep(0.3)
    assert th.is_alive()
    os.makedirs(tmp_path / "step00000006_universal" / "zero")  # what rank 0's rename makes appear at once
    th.join(5)
    assert out.get("ok") and out["s"] < 5


def test_rank0_failure_reaches_the_waiting_ranks(tmp_path):
    """The tag is not a complete checkpoint: rank 0's real conversion fails, the waiter stops with
    its message at once instead of waiting out the timeout."""
    (tmp_path / "step00000006").mkdir()
    (tmp_path / ".step00000006_universal.failed.old").write_text("an earlier start's failure")
    th, out = _wait_in_thread(tmp_path, "b2", timeout_s=30)
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        convert_on_rank0(str(tmp_path), "step00000006", 0, "b2", 30)
    th.join(5)
    assert "rank 0 could not convert checkpoint step00000006" in out["error"]
    assert "not a complete checkpoint" in out["error"] and out["s"] < 5
    assert not (tmp_path / ".step00000006_universal.failed.old").exists()  # stale markers go


def test_waiting_rank_times_out_with_advice(tmp_path):
    th, out = _wait_in_thread(tmp_path, "c3", timeout_s=0.3)
    th.join(5)
    assert "checkpoint.reshard_timeout_s" in out["error"] and "python -m pretrain.reshard" in out["error"]
