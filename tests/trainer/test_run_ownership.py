"""One launch owns a run directory (pretrain/lease.py), and ranks die with their launcher.

- A second launch into a run directory in use exits non-zero within 10 s naming the holder; the
  first finishes unaffected, bitwise equal to a run nobody disturbed.
- SIGKILL of torchrun (2 ranks) mid-run: no rank is alive 10 s later; a restart in the same
  directory, after the lease went stale (a short staleness setting), resumes exactly.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from trainer_harness import PY, REPO, Ranks, base_env, free_port, run_ranks, train_argv, train_losses

pytestmark = pytest.mark.slow

STEPS = 12


def common(run_dir: Path, shards: dict, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.train_index=[{shards['train']}]", f"train.steps={STEPS}",
            "checkpoint.every=4", "train.log_every=2", "tracking.enabled=false", *extra]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    root = run_dir / "checkpoints"
    return get_fp32_state_dict_from_zero_checkpoint(str(root), tag=(root / "latest").read_text().strip())


def assert_same_run(a: Path, b: Path, from_step: int) -> None:
    la, lb = train_losses(a), train_losses(b)
    for step in range(from_step, STEPS + 1):
        assert la[step] == lb[step], f"step {step}: {la[step]!r} vs {lb[step]!r}"
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def alive(pids: list[int]) -> list[int]:
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                if "\nState:\tZ" not in f.read():
                    out.append(pid)
        except FileNotFoundError:
            pass
    return out


def ranks_of(run_dir: Path, launcher: int = -1) -> list[int]:
    """PIDs of training processes whose command line names `run_dir` (the launcher left out)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if f"run_dir={run_dir}" in cmd and "pretrain.train" in cmd and int(d.name) != launcher:
                out.append(int(d.name))
    return alive(out)


@pytest.fixture(scope="module")
def undisturbed(tmp_path_factory, demo_shards) -> Path:
    base = tmp_path_factory.mktemp("undisturbed")
    run_ranks(train_argv(*common(base / "run", demo_shards)), 2, base, log_dir=base, timeout=300)
    return base / "run"


def test_second_launch_refused_first_unaffected(undisturbed, tmp_path, demo_shards):
    run_dir = tmp_path / "run"
    first_logs, second_logs = tmp_path / "first", tmp_path / "second"
    first_logs.mkdir()
    second_logs.mkdir()
    first = Ranks(train_argv(*common(run_dir, demo_shards)), 2, tmp_path, log_dir=first_logs)
    try:
        deadline = time.time() + 240
        while not (run_dir / "train_log.jsonl").exists() and time.time() < deadline:
            assert all(p.poll() is None for p in first.procs), first.output()
            time.sleep(0.2)
        t0 = time.time()
        codes, out = run_ranks(train_argv(*common(run_dir, demo_shards)), 2, tmp_path, log_dir=second_logs,
                               timeout=30, expect_ok=False)
        took = time.time() - t0
        assert all(c != 0 for c in codes), f"the second launch was not refused: {codes}\n{out}"
        assert took < 10, f"the second launch took {took:.1f} s to refuse"
        assert "in use by another launch" in out and f"pid {first.procs[0].pid}" in out, out
        assert first.wait(300) == [0, 0], first.output()
    finally:
        first.kill()
    assert_same_run(undisturbed, run_dir, 1)


def test_sigkill_of_torchrun_ends_its_ranks_and_a_restart_resumes_exactly(undisturbed, tmp_path, demo_shards):
    run_dir = tmp_path / "run"
    latest = run_dir / "checkpoints" / "latest"
    torchrun = str(Path(PY).parent / "torchrun")
    args = common(run_dir, demo_shards, "train.lease_stale_s=4", "train.lease_heartbeat_s=1")
    log = open(tmp_path / "torchrun.log", "w")
    launcher = subprocess.Popen([torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                                 "pretrain.train", "--config", str(REPO / "pretrain" / "configs" / "tiny.yaml"),
                                 *args, "debug.hang_at_step=6"], cwd=tmp_path, env=base_env(), stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and launcher.poll() is None:
            if latest.is_file() and latest.read_text().strip() == "step00000004" and len(ranks_of(run_dir, launcher.pid)) == 2:
                break
            time.sleep(0.2)
        workers = ranks_of(run_dir, launcher.pid)
        assert len(workers) == 2 and launcher.poll() is None, (tmp_path / "torchrun.log").read_text()[-3000:]
        time.sleep(1.0)  # mid-run: between the step-4 checkpoint and the end
        launcher.send_signal(signal.SIGKILL)
        launcher.wait(10)
        deadline = time.time() + 10
        while alive(workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not alive(workers), f"ranks {alive(workers)} outlived their killed launcher"
    finally:
        for pid in alive(ranks_of(run_dir, launcher.pid)):
            os.kill(pid, signal.SIGKILL)
        if launcher.poll() is None:
            launcher.kill()
        log.close()
    time.sleep(5)  # the lease, last refreshed by the dead rank 0, is now older than train.lease_stale_s=4
    logs = tmp_path / "restart"
    logs.mkdir()
    run_ranks(train_argv(*args), 2, tmp_path, log_dir=logs, timeout=300)
    out = (logs / "rank0.log").read_text()
    assert "run directory lease taken over" in out and "resuming from checkpoint" in out, out[-3000:]
    assert_same_run(undisturbed, run_dir, 5)
    assert not (run_dir / "run.lease").exists(), "a completed run releases its lease"

