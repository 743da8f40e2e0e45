"""ZeRO-3 training through mamba_ssm's Triton SSD kernels, on this CPU.

The trainer on a GPU takes the fused scan (a torch.autograd.Function that reads the Mamba-2
layer's D and dt_bias directly) under ZeRO-3's parameter gathering and release. Here both ranks
run `python -m pretrain.train` under Triton's interpreter (tests/model/triton_interpreter.py),
over gloo, and their losses and gradient norms must equal those of the same run on the pure
path: to fp32 rounding in fp32, and within bf16 noise under bf16 autocast, the GPU's precision.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from trainer_harness import PY, REPO, read_log, run_ranks, train_argv

sys.path.insert(0, str(REPO))
from tests.model import triton_interpreter  # noqa: E402

pytestmark = pytest.mark.slow

LAUNCHER = str(REPO / "tests" / "model" / "triton_interpreter.py")
STEPS = 2


@pytest.mark.parametrize("precision,loss_tol,grad_norm_tol", [("fp32", 1e-5, 1e-4), ("bf16", 2e-3, 1e-2)])
def test_zero3_training_on_the_fused_scan_equals_the_pure_path(tmp_path, demo_shards, precision, loss_tol,
                                                               grad_norm_tol):
    why = triton_interpreter.missing()
    if why:
        pytest.fail(f"{why}: this test needs `make setup`'s Triton and mamba-ssm sources")
    # Short micro-batches: the interpreter's cost grows with the chunks it scans (about 10 s of
    # one core per micro-batch of 256 bytes through the tiny config's two Mamba-2 layers).
    common = [f"data.train_index=[{demo_shards['train']}]", f"train.steps={STEPS}", "train.log_every=1",
              "tracking.enabled=false", "data.micro_batch_bytes=256", "data.step_bytes=1024",
              f"train.precision={precision}"]
    runs = {}
    for name, launch in (("pure", [PY]), ("fused", [PY, LAUNCHER])):
        run_dir = tmp_path / name
        logs = tmp_path / f"{name}-logs"
        logs.mkdir()
        argv = train_argv(f"run_dir={run_dir}", *common)
        _, out = run_ranks(launch + argv[1:], 2, tmp_path, log_dir=logs, timeout=420)
        runs[name] = {r["step"]: r for r in read_log(run_dir) if "loss" in r}
        for rank in (0, 1):
            text = (logs / f"rank{rank}.log").read_text(errors="replace")
            ran = "[triton-interpreter] first kernel launch" in text
            if name == "fused":  # every rank ran the kernels; rank 0 logs the selection
                assert ran, text[-3000:]
                assert rank or "[train] kernel mamba_ssm: active (Triton interpreter" in text, text[-3000:]
            else:
                assert not ran and (rank or "[train] kernel mamba_ssm: inactive" in text), text[-3000:]
    pure, fused = runs["pure"], runs["fused"]
    assert sorted(pure) == sorted(fused) == list(range(1, STEPS + 1)), json.dumps(runs)[:2000]
    for step in pure:
        p, f = pure[step], fused[step]
        assert f["n_micro"] == p["n_micro"] and f["bytes"] == p["bytes"]
        assert abs(f["loss"] - p["loss"]) <= loss_tol * abs(p["loss"]), (step, p["loss"], f["loss"])
        assert abs(f["grad_norm"] - p["grad_norm"]) <= grad_norm_tol * p["grad_norm"], (step, p, f)
