"""2 data-parallel ranks x 2 workers over gloo, real processes: exact resume, every document once,
resume at another dp_world, fail policy without hangs."""
from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys

import pytest
from dp_testutil import lognormal_docs, reassemble, write_shard_set

from data_pipeline import BalancedStepLoader

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    index, expected = write_shard_set(str(d / "good"), lognormal_docs(160, seed=4), docs_per_shard=20)
    bad_meta = json.loads(open(index).read())
    bad_meta["shards"].append({"path": "shard-999999.tar", "samples": 5})  # listed, not on disk
    bad_index = d / "good" / "bad_index.json"
    bad_index.write_text(json.dumps(bad_meta))
    write_shard_set(str(d / "tiny"), [b"the only document"], docs_per_shard=1)
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, "dist_loader_run.py"), str(r), "2", str(port),
                               index, str(bad_index), str(d / f"rank{r}.pkl")],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, o in zip(procs, outputs):
        assert p.returncode == 0, o[-4000:]
    res = [pickle.load(open(d / f"rank{r}.pkl", "rb")) for r in range(2)]
    return index, expected, res


@pytest.mark.slow
def test_exact_resume_two_ranks_two_workers(dist_run):
    _, _, res = dist_run
    for r in range(2):
        digests, resumes = res[r]["digests"], res[r]["resumes"]
        boundary = res[r]["epochs"].index(1)
        assert len(resumes) == 2 and any(k < boundary <= k + 8 for k in resumes)  # one crosses the epoch end
        for k, got in resumes.items():
            assert got == digests[k:k + 8], f"rank {r}: resume from step {k} differs from the uninterrupted run"
        assert res[r]["states_identical"]
    assert res[0]["digests"] != res[1]["digests"]  # the ranks really get different data


@pytest.mark.slow
def test_every_document_once_across_ranks_and_workers(dist_run):
    _, expected, res = dist_run
    mbs = [mb for r in range(2) for step in res[r]["epoch_mbs"] for mb in step]
    assert reassemble(mbs) == expected
    assert len(res[0]["epoch_mbs"]) == len(res[1]["epoch_mbs"])  # both ranks end at the same step
    assert all(len(a) == len(b) for a, b in zip(res[0]["epoch_mbs"], res[1]["epoch_mbs"]))


@pytest.mark.slow
def test_resume_at_dp_world_1_neither_repeats_nor_skips(dist_run):
    index, expected, res = dist_run
    assert res[0]["state6"] == res[1]["state6"]
    before = [mb for r in range(2) for step in res[r]["epoch_mbs"][:6] for mb in step]
    loader = BalancedStepLoader([index], 1024, 4096, dp_rank=0, dp_world=1, num_workers=2, seed=11, epochs=1)
    loader.load_state_dict(res[0]["state6"])
    after = [mb for step in loader for mb in step.micro_batches]
    assert reassemble(before + after) == expected


@pytest.mark.slow
def test_fail_policy_raises_on_every_rank(dist_run):
    _, _, res = dist_run
    for r in range(2):
        assert res[r]["fail_error"] and "shard-999999.tar" in res[r]["fail_error"]


@pytest.mark.slow
def test_ranks_without_data_still_step_together(dist_run):
    _, _, res = dist_run
    tiny0, tiny1 = res[0]["tiny"], res[1]["tiny"]
    assert len(tiny0) == len(tiny1) == 1 and len(tiny0[0]) == len(tiny1[0]) == 1
    got = sorted([tiny0[0][0], tiny1[0][0]])
    assert got == [(0, []), (17, ["shard-000000.tar:d0000000000"])]  # the idle rank gets a no-target row
