"""Fixtures for the SLURM tests: the local single-node cluster and a tiny shard set.

The cluster fixture installs and starts SLURM itself (cluster/local_slurm.sh), so `make test`
alone runs these tests on a Debian machine as root; elsewhere they skip with the reason.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.cluster.slurm_harness import LOCAL_SLURM, REPO, run_script, why_no_local_slurm


@pytest.fixture(scope="session")
def slurm_cluster():
    reason = why_no_local_slurm()
    if reason:
        pytest.skip(reason)
    rc, out = run_script([str(LOCAL_SLURM), "install"], timeout=600)
    if rc != 0:
        pytest.skip(f"SLURM could not be installed (cluster/local_slurm.sh install exit {rc}): {out[-1500:]}")
    was_running = run_script([str(LOCAL_SLURM), "status"], timeout=60)[0] == 0
    rc, out = run_script([str(LOCAL_SLURM), "start"], timeout=180)
    if rc != 0:
        pytest.skip(f"SLURM could not be started (cluster/local_slurm.sh start exit {rc}): {out[-1500:]}")
    yield
    # Leave a cluster someone else started (or one asked to be kept) running.
    if not was_running and not os.environ.get("HNET_KEEP_SLURM"):
        run_script([str(LOCAL_SLURM), "stop"], timeout=120)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """A ~400 KB demo corpus as WebDataset shards; returns the train index.json path."""
    out = tmp_path_factory.mktemp("slurm_shards")
    res = subprocess.run([sys.executable, "-m", "data_pipeline.shard", "--demo", str(out), "--demo-bytes", "400KB",
                          "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    return str(out / "train" / "index.json")
