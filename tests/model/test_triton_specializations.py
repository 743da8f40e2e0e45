"""tests/bench/bench_triton_specializations.py, which scripts/gpu_results/README.md quotes, finds
the Triton compilations of an inner level's Mamba scan from the launch arguments alone: here over
lengths 257..290 of the 2-stage L's level 1, where a length divisible by 16 (272, 288) is the only
thing that changes a key."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.model import triton_interpreter

ROOT = Path(__file__).resolve().parents[2]


def test_the_keys_change_only_with_the_length_divisible_by_16(tmp_path):
    why = triton_interpreter.missing()
    if why:
        pytest.fail(f"{why}: this test needs `make setup`'s Triton and mamba-ssm sources")
    out = tmp_path / "keys.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "HNET_DISABLE_FUSED")}
    subprocess.run([sys.executable, str(ROOT / "tests/bench/bench_triton_specializations.py"),
                    "--min-length", "257", "--max-length", "290", "--json", str(out)],
                   check=True, timeout=300, env=env, capture_output=True)
    r = json.loads(out.read_text())
    assert r["widths"]["nheads"] == 32 and r["widths"]["chunk_size"] == 256
    kernels = r["kernels"]
    # the forward's five kernels and the backward's nine, each launched at every length
    assert len(kernels) == 14, sorted(kernels)
    assert kernels["_chunk_scan_fwd_kernel"] == {"distinct_keys": 2, "first_seen_at_lengths": [257, 272]}
    for name, k in kernels.items():
        # launched once or twice per call: one key (or two) per class of length, no more
        assert set(k["first_seen_at_lengths"]) == {257, 272}, name
    assert r["compilations_over_all_lengths"] == sum(k["distinct_keys"] for k in kernels.values())
