"""scripts/gpu_check.py only runs where a GPU is lent, rarely: its CPU mode runs the same
throughput code (the trainer's step executor on packed text rows, the FLOP-matched baseline, the
MFU arithmetic) on the tiny config, so that the script does not rot between GPU sessions."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_mode_reports_throughput_of_hnet_and_its_baseline(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}  # the only process running
    res = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--out", str(out)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    # the norms against their written-out formula; on CPU torch runs F.rms_norm as that composite
    norms = report["norms"]
    assert set(norms) == {"torch.float32", "torch.bfloat16"}
    for by_norm in norms.values():
        assert set(by_norm) == {"rmsnorm", "gated_4_groups"}
        assert all(r["pass"] and r["max_rel_err"] == 0.0 and not r["fused_kernel"] and r["aten_ops_fwd_bwd"] > 6
                   for r in by_norm.values())
    tp = report["throughput_train_step"]
    assert tp["step_bytes"] == 2 * 1024, "two full 1 KB rows of text"
    hnet, iso = tp["tiny/hnet"], tp["tiny/isotropic_transformer"]
    assert hnet["bytes_per_s"] > 0 and iso["bytes_per_s"] > 0 and hnet["loss"] == hnet["loss"]
    assert len(hnet["bytes_per_chunk"]) == 1 and hnet["bytes_per_chunk"][0] > 1.0
    assert json.loads(iso["layout"])[0].startswith("T"), "the baseline is a Transformer"
    # the FLOP figure (and so MFU) is taken at the compression the run measured, not at the target
    sys.path.insert(0, str(ROOT))
    from pretrain.model import HNetConfig, flops_per_byte, stage_compression
    from tests.bench.bench_model import CONFIGS

    tiny = HNetConfig.from_dict(CONFIGS["tiny"])
    measured = flops_per_byte(tiny, stage_compression(hnet["bytes_per_chunk"]), 256)
    assert hnet["flops_per_byte"] == pytest.approx(measured, rel=1e-9)
    assert measured != pytest.approx(flops_per_byte(tiny, tiny.ratio_targets, 256), rel=1e-3)
    assert "mfu" not in hnet, "no MFU without a known peak"
    assert hnet["aten_ops_per_step"] > 1000 and iso["aten_ops_per_step"] < hnet["aten_ops_per_step"]
    top = hnet["host_top_ops"]
    assert 0 < len(top) <= 12 and all(isinstance(name, str) and calls >= 1 and ms >= 0 for name, calls, ms in top)
    assert [ms for _, _, ms in top] == sorted((ms for _, _, ms in top), reverse=True), "the costliest first"
    assert len(hnet["timed_steps"]) == 1 and hnet["step_s"] == pytest.approx(hnet["timed_steps"][0]["s"], abs=1e-4)


@pytest.mark.slow
def test_cpu_mode_runs_the_kernel_comparisons_under_the_triton_interpreter(tmp_path):
    """The GPU check's SSD and model comparisons, which otherwise run only on a lent GPU, on small
    sizes through mamba-ssm's Triton kernels (tests/model/triton_interpreter.py)."""
    sys.path.insert(0, str(ROOT))
    from tests.model import triton_interpreter

    why = triton_interpreter.missing()
    if why:
        pytest.fail(f"{why}: this test needs `make setup`'s Triton and mamba-ssm sources")
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, "scripts/gpu_check.py", "--device", "cpu", "--triton-interpreter",
                          "--out", str(out)], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "2"},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["kernels"]["mamba_ssm"].startswith("active (Triton interpreter")
    assert set(report["ssd"]) == {"torch.float32", "torch.bfloat16"}
    assert all(r["pass"] for r in report["ssd"].values()), report["ssd"]
    assert report["ssd"]["torch.float32"]["forward_rel_err"] < 1e-5
    assert set(report["model"]) == {"1-stage", "2-stage"} and all(r["pass"] for r in report["model"].values())
    launched = report["triton_kernel_launches"]
    assert launched.get("_chunk_scan_fwd_kernel", 0) > 0, launched
    assert any("_bwd_" in k for k in launched), launched  # the gradients went through the kernels too
    assert report["throughput_train_step"]["tiny/hnet"]["bytes_per_s"] > 0


@pytest.mark.slow
def test_the_prepared_script_checks_itself_on_cpu_and_gates_the_resume(tmp_path):
    """scripts/gpu_check.sh end to end on CPU (its self-check mode): the kernel JSON, the trainer
    launched, killed after step 18 and resumed from step 15, the resume judged against an
    uninterrupted run; $OUT holds only the JSON files and logs (a device run brings back few files)."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "DEVICE": "cpu", "CONFIG": "pretrain/configs/tiny.yaml", "PRECISION": "fp32",
           "OUT": str(out), "WORK": str(work), "OMP_NUM_THREADS": "2", "TRAIN_TIMEOUT_S": "150",
           # two threads: without deterministic algorithms a gather's backward adds with parallel
           # atomics on CPU, and two runs of one seed differ in the last bits when the CPU is busy
           "DETERMINISTIC": "true"}
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    report = json.loads((out / "gpu_check.json").read_text())
    t = report["trainer"]
    assert t["ok"] and t["exit_codes"] == {"uninterrupted": 0, "resumed": 0}, t
    assert t["steps_uninterrupted"] == 30 and t["resumed_from"] == 15 and t["status"] == "completed", t
    assert t["max_rel_loss_diff_after_resume"] <= 1e-5 and t["losses_finite"], t
    assert t["max_rel_loss_diff_before_the_kill"] == 0.0, "two deterministic fp32 CPU runs of one seed agree before the kill"
    assert report["checks"]["conv"]["skipped"], "causal-conv1d is CUDA only: the reason is reported"
    assert report["sample"]["exit_code"] == 0 and report["sample"]["bytes_generated"], report["sample"]
    assert all(0 < n <= 64 for n in report["sample"]["bytes_generated"]), "generated from the resumed run"
    # the pipeline over 2 CPU ranks (on GPUs it needs two of them)
    assert report["pipeline"]["ok"] and report["pipeline"]["steps"] == 10, report["pipeline"]
    assert report["pipeline"]["rank_exit"] == ["0", "0"], report["pipeline"]
    assert report["pipeline"]["stage_checkpoints"] == ["pipe0", "pipe1"], "split over the ranks, not data-parallel"
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.json", "kernels.json", "kernels.log", "killed.log",
                                                     "pipeline0.log", "pipeline1.log", "resumed.log", "sample.log",
                                                     "straight.log"]
    # a resume that does not match fails the check: a tolerance no run can meet
    # (and a pipeline that outlives its time is ended by its pids and fails the check)
    res = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=ROOT, env={**env, "RESUME_TOL": "-1",
                                                                         "PIPE_TIMEOUT_S": "2"},
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 6, res.stdout[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["trainer"]["ok"] is False
    assert report["pipeline"]["exit_code"] == 124 and report["pipeline"]["ok"] is False, report["pipeline"]
    assert report["pipeline"]["rank_exit"] == ["killed", "killed"], report["pipeline"]
    left = subprocess.run(["pgrep", "-f", f"run_dir={work}/pipeline"], capture_output=True, text=True).stdout
    assert not left.strip(), f"pipeline ranks left running: {left}"


def test_smallest_tiles_limits_every_autotuned_ssd_kernel_and_gives_the_lists_back():
    """The GPU check compiles each autotuned mamba_ssm kernel once, in its configuration of least
    shared memory, for the comparisons and the trainer run (all ~120 compilations per key would take
    minutes of a short lease), and gives the full lists back for the throughput rows."""
    sys.path.insert(0, str(ROOT))
    from tests.model import triton_interpreter

    why = triton_interpreter.missing()
    if why:
        pytest.fail(f"{why}: this test needs `make setup`'s Triton and mamba-ssm sources")
    probe = r"""
import importlib, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
sys.path.insert(0, sys.argv[2] + "/scripts")
import gpu_check
gpu_check.load_mamba_triton(sys.argv[3])
from triton.runtime.autotuner import Autotuner
tuners = {}
for m in ("ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan", "ssd_combined"):
    mod = importlib.import_module("mamba_ssm.ops.triton." + m)
    tuners.update({f"{m}.{k}": v for k, v in vars(mod).items() if isinstance(v, Autotuner)})
full = {k: list(t.configs) for k, t in tuners.items()}
for t in tuners.values():
    t.cache[("a key",)] = t.configs[-1]  # as if one had been tuned before
limited, restore = gpu_check.smallest_tiles()
now = {k: list(t.configs) for k, t in tuners.items()}
smallest = all(len(now[k]) == 1 and gpu_check.tile_cost(now[k][0]) == min(map(gpu_check.tile_cost, full[k]))
               for k in tuners if len(full[k]) > 1)
forgot = all(not t.cache for k, t in tuners.items() if len(full[k]) > 1)
restore()
back = all(list(t.configs) == full[k] for k, t in tuners.items())
print(json.dumps({"tuners": len(tuners), "multi": sum(len(c) > 1 for c in full.values()), "limited": limited,
                  "smallest": smallest, "forgot": forgot, "back": back}))
"""
    res = subprocess.run([sys.executable, "-c", probe, str(triton_interpreter.TRITON_DIR), str(ROOT),
                          str(triton_interpreter.MAMBA_SRC)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["multi"] >= 15 and got["limited"] == got["multi"], got
    assert got["smallest"] and got["forgot"] and got["back"], got
