"""cluster/slurm/train.sbatch across hosts, on the multi-host SLURM of cluster/local_slurm_hosts.sh.

Three compute hosts (network + UTS namespaces joined by a bridge) and one run directory that
three jobs continue in turn, as a run on a real cluster does:
 1. 2 hosts x 2 ranks train, are preempted (scancel --signal=USR1 --full), requeue and finish;
 2. a new job on 3 hosts x 1 rank continues the run (the trainer reshards 4 -> 3 ranks);
 3. a job on 2 of the 3 hosts loses one mid-run: the attempt fails fast, the job requeues and
    finishes from the last complete checkpoint on the 2 hosts that remain.
Across all of it the data stream reads every document of the epoch once (debug.log_keys), and
MLflow holds one run. The tests run in order and share the run directory.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from tests.cluster.slurm_harness import (REPO, SBATCH_SCRIPT, TINY, job_env, jobcomp_records, jobcomp_states,
                                         run_script, sbatch, slurm_seconds, tail, wait_for, wait_for_job,
                                         why_no_local_slurm)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HOSTS_SCRIPT = REPO / "cluster" / "local_slurm_hosts.sh"
CONF = "/etc/slurm-hnet-hosts/slurm.conf"
JOBCOMP = Path("/var/log/hnet-hosts/jobcomp.log")
ADDR = {"hnet1": "10.213.7.11", "hnet2": "10.213.7.12", "hnet3": "10.213.7.13"}
STEPS = (8, 16, 30)  # where each of the three jobs ends
OPTS = ["--time=10", "--signal=USR1@20", "--job-name=hnet-multihost-test"]


def why_no_hosts() -> str | None:
    reason = why_no_local_slurm()
    if reason:
        return reason
    missing = [c for c in ("ip", "nsenter", "unshare") if shutil.which(c) is None]
    return f"the multi-host SLURM needs {', '.join(missing)} (iproute2, util-linux)" if missing else None


@pytest.fixture(scope="module")
def hosts():
    """The 3-host cluster, and SLURM_CONF pointing every sbatch/scontrol of this module at it."""
    reason = why_no_hosts()
    if reason:
        pytest.skip(reason)
    was_running = run_script([str(HOSTS_SCRIPT), "status"], timeout=60)[0] == 0
    rc, out = run_script([str(HOSTS_SCRIPT), "start", "3"], timeout=600)  # installs SLURM when missing
    if rc != 0:
        pytest.skip(f"the multi-host SLURM could not be started (cluster/local_slurm_hosts.sh start exit {rc}): "
                    f"{out[-1500:]}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = CONF
    yield
    subprocess.run(["scancel", "--name=hnet-multihost-test"], capture_output=True, timeout=30)
    if old is None:
        os.environ.pop("SLURM_CONF")
    else:
        os.environ["SLURM_CONF"] = old
    if not was_running and not os.environ.get("HNET_KEEP_SLURM"):
        run_script([str(HOSTS_SCRIPT), "stop"], timeout=120)
    else:
        run_script([str(HOSTS_SCRIPT), "revive-host", "hnet2"], timeout=60)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """~250 KB of seeded random text as 260 documents in ~8 shards: the jobs read about 130 KB of it,
    so the whole run stays in its first epoch. Returns (train index.json, every document's key)."""
    root = tmp_path_factory.mktemp("multihost_corpus")
    docs = root / "docs"
    docs.mkdir()
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(400)]
    for i in range(260):
        text, n = [], rng.randint(250, 1650)
        while sum(len(w) + 1 for w in text) < n:
            text.append(rng.choice(words))
        (docs / f"doc{i:03d}.txt").write_text(" ".join(text) + "\n")
    res = subprocess.run([sys.executable, "-m", "data_pipeline.shard", str(root / "shards"), str(docs),
                          "--shard-size", "32KB", "--quiet"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    train = root / "shards" / "train"
    keys = set()
    for shard in sorted(train.glob("*.tar")):
        with tarfile.open(shard) as tar:
            keys |= {f"{shard.name}:{Path(m.name).stem}" for m in tar.getmembers() if m.isfile()}
    assert len(keys) == 260 and len(list(train.glob("*.tar"))) >= 4
    return str(train / "index.json"), keys


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost_run")
    return {"dir": root / "run", "uri": f"sqlite:///{root / 'mlflow.db'}", "root": root, "jobs": []}


def submit(run: dict, corpus, name: str, layout: list[str], steps: int, *overrides: str) -> tuple[str, Path]:
    out = run["root"] / f"{name}.out"
    env = job_env(HNET_RUN_DIR=str(run["dir"]), MLFLOW_TRACKING_URI=run["uri"], SLURM_CONF=CONF)
    job = sbatch([*OPTS, *layout, f"--output={out}", str(SBATCH_SCRIPT), TINY, f"data.train_index=[{corpus[0]}]",
                  f"train.steps={steps}", "tracking.experiment=multihost", "debug.log_keys=true", *overrides], env=env)
    run["jobs"].append(job)
    return job, out


def host_lines(log: str) -> dict[str, tuple[str, str]]:
    """launch.sh's line per host: name -> (address, 'N of the W ranks')."""
    return {m[0]: (m[1], m[2]) for m in re.findall(r"host (\S+) \((\S+)\): node \d+, (\d+ of the \d+ ranks)", log)}


def step_records(run_dir: Path) -> dict[int, dict]:
    """The newest record of every step: steps trained again after a failure replace the lost ones."""
    out = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "keys" in rec:
            out[rec["step"]] = rec
    return out


def latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().strip()[4:12]) if latest.exists() else -1


def mlflow_run(run: dict):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=run["uri"])
    exp = client.get_experiment_by_name("multihost")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, f"{len(runs)} MLflow runs, one expected"
    return client, runs[0]


def rest_of_epoch(run_dir: Path, index: str) -> list[list[str]]:
    """The documents the run has not read yet: a 1-rank loader resumed from the latest checkpoint's
    loader state (the same re-dealing a resume on another layout does) read to the epoch's end."""
    import torch

    from data_pipeline import BalancedStepLoader

    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    saved = torch.load(run_dir / "checkpoints" / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                       map_location="cpu", weights_only=False)["states"]["data"]
    loader = BalancedStepLoader([index], micro_batch_bytes=1024, step_bytes=4096, epochs=1)
    saved = {**saved, "cost_model": loader.cost_model.state_dict()}  # the order of the rest does not matter
    loader.load_state_dict(saved)
    try:
        return [[k for mb in step.micro_batches for k in mb.keys] for step in loader]
    finally:
        loader.close()


def assert_every_document_once(records: dict[int, dict], rest: list[list[str]], corpus_keys: set[str]) -> None:
    """Each document is read in one run of consecutive steps (a document split across a step boundary
    continues in the next step), and the run plus the rest of the epoch read every document."""
    steps = sorted(records)
    assert steps == list(range(1, steps[-1] + 1)), f"steps missing from train_log.jsonl: {steps}"
    seen: dict[str, list[int]] = {}
    for i, keys in enumerate([records[s]["keys"] for s in steps] + rest, start=1):
        for k in {k.split("@")[0] for k in keys}:
            seen.setdefault(k, []).append(i)
    repeated = {k: v for k, v in seen.items() if v != list(range(v[0], v[-1] + 1))}
    assert not repeated, f"documents read again later: {dict(list(repeated.items())[:5])}"
    assert set(seen) == corpus_keys, f"skipped: {sorted(corpus_keys - set(seen))[:5]}, " \
                                     f"unknown: {sorted(set(seen) - corpus_keys)[:5]}"


@pytest.mark.timeout(900)  # includes installing SLURM when this module runs alone
def test_two_hosts_train_preempt_requeue_and_finish(hosts, corpus, run):
    job, out = submit(run, corpus, "two_by_two", ["--nodes=2", "--ntasks-per-node=2"], STEPS[0])
    log_file = run["dir"] / "train_log.jsonl"
    wait_for(lambda: log_file.exists() and len(log_file.read_text().splitlines()) >= 2, timeout=240,
             what=f"job {job} to train 2 steps ({out})")
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True, timeout=30)
    info = wait_for_job(job, timeout=300, output=out)
    log = tail(out, 20000)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    assert jobcomp_states(job, JOBCOMP) == ["PENDING", "COMPLETED"], log
    assert "requeueing" in log and "resuming from checkpoint" in log, log
    # Each host's ranks ran in its own namespace: its own hostname, and the address its name resolves to there.
    assert host_lines(log) == {h: (ADDR[h], "2 of the 4 ranks") for h in ("hnet1", "hnet2")}, log
    assert "WORLD_SIZE=4 MASTER_ADDR=hnet1" in log, log
    records = step_records(run["dir"])
    assert sorted(records) == list(range(1, STEPS[0] + 1))
    shards = list((run["dir"] / "checkpoints" / f"step{STEPS[0]:08d}").glob("zero_pp_rank_*_model_states.pt"))
    assert len(shards) == 4
    client, mrun = mlflow_run(run)
    assert mrun.data.tags["slurm.nodelist"] == "hnet[1-2]" and mrun.data.tags["restart_count"] == "1"
    assert sorted(m.step for m in client.get_metric_history(mrun.info.run_id, "train/loss")) == \
        list(range(1, STEPS[0] + 1))


@pytest.mark.timeout(600)
def test_three_hosts_continue_the_run(hosts, corpus, run):
    job, out = submit(run, corpus, "three_by_one", ["--nodes=3", "--ntasks-per-node=1"], STEPS[1])
    info = wait_for_job(job, timeout=300, output=out)
    log = tail(out, 20000)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "0", log
    assert "written by 4 ranks, now 3" in log, log
    assert host_lines(log) == {h: (ADDR[h], "1 of the 3 ranks") for h in ("hnet1", "hnet2", "hnet3")}, log
    assert sorted(step_records(run["dir"])) == list(range(1, STEPS[1] + 1))
    _, mrun = mlflow_run(run)  # one run, now in its third attempt
    tags = mrun.data.tags
    assert tags["restart_count"] == "2" and tags["slurm.job_id"] == job
    assert (tags["restart_0.slurm.nodelist"], tags["restart_2.slurm.nodelist"]) == ("hnet[1-2]", "hnet[1-3]")


@pytest.mark.timeout(900)
def test_host_death_requeues_on_the_remaining_hosts(hosts, corpus, run):
    wait_for(lambda: node_states() == ["idle"] * 3, timeout=60, what="all 3 hosts idle")
    job, out = submit(run, corpus, "host_death", ["--nodes=2", "--ntasks-per-node=1"], STEPS[2], "checkpoint.every=2")
    start = STEPS[1]
    wait_for(lambda: latest_step(run["dir"]) >= start + 4, timeout=240, what=f"job {job} to checkpoint step {start + 4}")
    assert job_nodes(job) == "hnet[1-2]"
    rc, msg = run_script([str(HOSTS_SCRIPT), "kill-host", "hnet2"], timeout=60)
    killed_at, at_kill = time.time(), latest_step(run["dir"])
    assert rc == 0, msg
    info = wait_for_job(job, timeout=420, output=out)
    log = tail(out, 20000)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", log
    # The peers of the dead host's rank fail at once; SLURM declares the node down (SlurmdTimeout)
    # and requeues the job itself: that attempt ended as NODE_FAIL, within 2 minutes of the death.
    first, second = jobcomp_records(job, JOBCOMP)
    assert (first["JobState"], second["JobState"]) == ("NODE_FAIL", "COMPLETED"), log
    ended_in = slurm_seconds(first["EndTime"]) - killed_at
    assert ended_in < 120, f"the attempt ended {ended_in:.0f} s after the host died:\n{log}"
    assert "Exited with exit code 1" in log and "DUE TO NODE FAILURE" in log, log
    m = re.search(r"restart 1, nodes (\S+), 2 tasks; .* latest checkpoint step (\d+)", log)
    assert m, log
    resumed = int(m[2])
    assert at_kill <= resumed <= at_kill + 2 and re.search(rf"resuming from checkpoint \S+ at step {resumed} \(", log), log
    # The first attempt resharded the 3 ranks' checkpoint to 2; the rerun ran on the hosts that remain.
    assert "written by 3 ranks, now 2" in log and m[1] == "hnet[1,3]", log
    assert host_lines(log)["hnet3"] == (ADDR["hnet3"], "1 of the 2 ranks"), log
    records = step_records(run["dir"])
    assert sorted(records) == list(range(1, STEPS[2] + 1))
    assert_every_document_once(records, rest_of_epoch(run["dir"], corpus[0]), corpus[1])
    _, mrun = mlflow_run(run)
    assert mrun.data.tags["restart_4.slurm.nodelist"] == "hnet[1,3]" and mrun.info.status == "FINISHED"
    print(f"host death: the attempt ended {ended_in:.0f} s after the kill; resumed from step {resumed}")


def node_states() -> list[str]:
    res = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, timeout=30)
    return res.stdout.split()


def job_nodes(job: str) -> str:
    from tests.cluster.slurm_harness import job_info

    return job_info(job).get("NodeList", "")
