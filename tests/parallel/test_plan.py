"""The capacity planner (parallel/plan.py) against real engines over gloo: for 1, 2 and 4 ranks
and ZeRO-1, 2 and 3, the parameter, master and optimizer elements a rank holds (counted from the
engine's tensors) equal the prediction, and the bytes its collectives moved in one step (DeepSpeed's
comms logger) are within 10% of it. Plus the CLI on the public configs."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer"))

from trainer_harness import PY, base_env, run_ranks  # noqa: E402

WORKER = str(REPO / "tests" / "parallel" / "plan_worker.py")
MICRO_BATCHES = 2
ZERO = ("zero1", "zero2", "zero3")  # measured one after another in one launch per world size


@pytest.fixture(scope="module")
def small_model():
    from parallel.plan import load_model_config

    model_cfg, _ = load_model_config(str(REPO / "pretrain" / "configs" / "small.yaml"))
    return model_cfg


@pytest.fixture(scope="module")
def numels(small_model):
    from parallel.plan import parameter_numels

    return parameter_numels(small_model)


@pytest.mark.slow
@pytest.mark.parametrize("world, precision", [(1, "fp32"), (2, "fp32"), (4, "fp32"), (2, "bf16")])
def test_predicted_state_and_communication_match_the_engine(tmp_path, numels, small_model, world, precision):
    """bf16 (DeepSpeed's torch_autocast): the gradients of nn.Linear / nn.Conv1d parameters are
    reduced and their ZeRO-3 gathers made in bf16, about half the fp32 bytes; state is unchanged."""
    from parallel.plan import comm_bytes, parameter_sizes, state_bytes

    out = tmp_path / "out.json"
    run_ranks([PY, WORKER, str(out), "--zero", ",".join(ZERO), "--micro-batches", str(MICRO_BATCHES),
               "--precision", precision], world, REPO, log_dir=tmp_path, timeout=300)
    _, elem_bytes = parameter_sizes(small_model, precision)
    results = json.loads(out.read_text())
    assert sorted(results) == sorted(ZERO)
    for zero in ZERO:
        got, want = results[zero], state_bytes(numels, zero, world)
        for key in ("params", "master", "optimizer"):
            assert got["held"][key] * 4 == want[key], f"{zero} x {world}: {key} held {got['held'][key] * 4} bytes, " \
                                                      f"predicted {want[key]}"
        predicted = comm_bytes(numels, zero, world, MICRO_BATCHES, elem_bytes=elem_bytes)
        for op in ("all_gather", "reduce_scatter", "all_reduce"):
            measured = got["moved"].get(op, 0)
            print(f"{zero} x {world} {precision} {op}: measured {measured}, predicted {predicted[op]:.0f}")
            assert abs(measured - predicted[op]) <= 0.1 * max(predicted[op], 1e3), \
                f"{zero} x {world}: {op} moved {measured} bytes, predicted {predicted[op]:.0f}"


@pytest.mark.parametrize("config", ["tests/fixtures/hnet_2stage_XL.json", "pretrain/configs/hnet_1stage_L.yaml"])
def test_cli_recommends_a_layout_that_fits(tmp_path, config):
    res = subprocess.run([PY, "-m", "parallel.plan", str(REPO / config), "--nodes", "8", "--gpus-per-node", "8",
                          "--gpu", "H100", "--json", str(tmp_path / "plan.json")], cwd=REPO, env=base_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["recommended"].startswith("sbatch --nodes=8 --ntasks-per-node=8")
    best = next(l for l in plan["layouts"] if l["fits"])
    assert best["memory_gb"] <= 80 and 0 < best["mfu"] < 1
    assert {l["zero"] for l in plan["layouts"]} >= {"zero1", "zero2", "zero3"}


def test_a_model_too_large_for_one_gpu_does_not_fit_without_sharding():
    from parallel.plan import cluster_of, load_model_config, plan

    model_cfg, _ = load_model_config(str(REPO / "tests" / "fixtures" / "hnet_2stage_XL.json"))
    layouts = plan(model_cfg, cluster_of(1, 1, "NAME:100:8"), 256 * 8192, 8192)
    assert not any(l.fits and l.zero in ("zero1", "zero2", "zero3") for l in layouts)


@pytest.mark.parametrize("argv, named", [
    (["--nodes", "0", "--gpus-per-node", "8"], "--nodes must be >= 1"),
    (["--nodes", "-2", "--gpus-per-node", "8"], "--nodes must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
    (["--nodes", "1", "--gpus-per-node", "8", "--efficiency", "0"], "--efficiency is a share of the peak"),
    (["--nodes", "1", "--gpus-per-node", "8", "--micro-batch-bytes", "-1"], "--micro-batch-bytes must be > 0"),
])
def test_cli_refuses_a_cluster_that_cannot_be(argv, named):
    # each of these divided by zero or printed negative step times and an sbatch line for -2 nodes
    res = subprocess.run([PY, "-m", "parallel.plan", str(REPO / "pretrain/configs/hnet_1stage_L.yaml"), *argv],
                         cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and named in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_cli_names_a_missing_config():
    res = subprocess.run([PY, "-m", "parallel.plan", "no/such.yaml", "--nodes", "1", "--gpus-per-node", "8"],
                         cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "no/such.yaml: no such file" in res.stderr and "Traceback" not in res.stderr
