"""cluster/slurm/train.sbatch on the real single-node SLURM: train, preempt + requeue + resume, fail fast.

Each job trains the tiny config with 2 tasks (2 CPU processes, DeepSpeed ZeRO-3 over gloo).
The uninterrupted run is the reference that the preempted run must match exactly.
"""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest

from tests.cluster.slurm_harness import (SBATCH_SCRIPT, TINY, job_env, jobcomp_states, sbatch, slurm_seconds,
                                         tail, wait_for, wait_for_job)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 40  # long enough (about 10 s of steps) for a signal sent after step 2 to land mid-run
# A time limit as a safety net (a stuck job dies on its own); the pre-timeout signal is set
# far from it so that only the test's own `scancel --signal` preempts.
JOB_OPTS = ["--ntasks-per-node=2", "--time=8", "--signal=USR1@20", "--job-name=hnet-slurm-test"]


SUBMITTED: list[str] = []


@pytest.fixture(autouse=True)
def cancel_leftover_jobs():
    """A test that fails while its job still runs must not leave it holding the node's CPUs."""
    yield
    while SUBMITTED:
        subprocess.run(["scancel", SUBMITTED.pop()], capture_output=True, timeout=30)


def submit(tmp: Path, name: str, *overrides: str, train_index: str) -> tuple[str, Path, Path, str]:
    """Submits the tiny config; returns (job id, run dir, job output file, MLflow URI)."""
    run_dir = tmp / name
    out = tmp / f"{name}.out"
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    env = job_env(HNET_RUN_DIR=str(run_dir), MLFLOW_TRACKING_URI=uri)
    job = sbatch([*JOB_OPTS, f"--output={out}", str(SBATCH_SCRIPT), TINY, f"data.train_index=[{train_index}]",
                  f"train.steps={STEPS}", "tracking.experiment=slurm-tests", *overrides], env=env)
    SUBMITTED.append(job)
    return job, run_dir, out, uri


def losses(run_dir: Path) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out.setdefault(rec["step"], []).append(rec["loss"])
    return out


def final_params(run_dir: Path) -> dict:
    """The consolidated fp32 parameters of the run's `latest` checkpoint (from the ZeRO-3 shards)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = run_dir / "checkpoints"
    tag = (ckpt / "latest").read_text().strip()
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=tag)


def mlflow_runs(uri: str, job_id: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("slurm-tests")
    assert exp is not None, f"no MLflow experiment 'slurm-tests' in {uri}"
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`slurm.job_id` = '{job_id}'")
    return client, runs


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("slurm_jobs")


@pytest.fixture(scope="module")
def reference_run(slurm_cluster, tiny_shards, workdir):
    """The uninterrupted run: submitted once, checked by the first test, compared against by the second."""
    job, run_dir, out, uri = submit(workdir, "reference", train_index=tiny_shards)
    info = wait_for_job(job, timeout=240, output=out)
    return {"job": job, "run_dir": run_dir, "out": out, "uri": uri, "info": info}


@pytest.mark.timeout(900)  # includes installing and starting SLURM when this test runs alone
def test_sbatch_trains_checkpoints_and_tracks(reference_run):
    job, run_dir, out, info = reference_run["job"], reference_run["run_dir"], reference_run["out"], reference_run["info"]
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", tail(out)
    assert info["Restarts"] == "0"
    assert jobcomp_states(job) == ["COMPLETED"]
    squeue = subprocess.run(["squeue", "-h", "--states=all", "-j", job, "-o", "%T"], capture_output=True,
                            text=True, timeout=30)
    assert squeue.stdout.strip() == "COMPLETED"
    # Both ranks trained: 2 tasks, one rendezvous, every step logged once.
    log = tail(out)
    assert "WORLD_SIZE=2" in log and f"finished: step {STEPS} of {STEPS}" in log, log
    assert sorted(losses(run_dir)) == list(range(1, STEPS + 1))
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step{STEPS:08d}"
    shards = sorted(p.name for p in (ckpt / f"step{STEPS:08d}").glob("zero_pp_rank_*_model_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]

    client, runs = mlflow_runs(reference_run["uri"], job)
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["slurm.nodelist"] == "localhost"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))
    assert history[-1].value < history[0].value  # it learned something


@pytest.mark.timeout(900)
def test_preemption_requeues_and_resumes_exactly(reference_run, tiny_shards, workdir):
    job, run_dir, out, uri = submit(workdir, "preempted", train_index=tiny_shards)
    log_file = run_dir / "train_log.jsonl"

    def trained(n: int) -> bool:
        return log_file.exists() and len(log_file.read_text().splitlines()) >= n

    wait_for(lambda: trained(2), timeout=180, what=f"job {job} to train 2 steps ({out})")
    # What a site's preemption or an operator does: signal every task and the batch shell.
    subprocess.run(["scancel", "--signal=USR1", "--full", job], check=True, timeout=30)
    # A requeued job goes straight back to PENDING, never through a terminal state.
    info = wait_for_job(job, timeout=300, output=out)
    log = tail(out)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["Restarts"] == "1", log
    # The first run ended in a requeue (jobcomp records the job going back to PENDING), the second completed.
    assert jobcomp_states(job) == ["PENDING", "COMPLETED"], log
    assert "requeueing" in log and "resuming from checkpoint" in log, log
    preempted_at = int(log.split("checkpointed at step ")[1].split()[0])
    assert 2 <= preempted_at < STEPS, log

    # Exactly the uninterrupted run: the same losses at every step and the same final parameters.
    got, want = losses(run_dir), losses(reference_run["run_dir"])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(len(v) == 1 for v in got.values()), "a step was trained twice"
    assert got == want
    a, b = final_params(run_dir), final_params(reference_run["run_dir"])
    assert a.keys() == b.keys() and len(a) > 0
    mismatched = [k for k in a if not (a[k].shape == b[k].shape and bool((a[k] == b[k]).all()))]
    assert not mismatched, f"parameters differ from the uninterrupted run: {mismatched[:5]}"

    # One MLflow run across the restart, tagged with SLURM's restart count.
    client, runs = mlflow_runs(uri, job)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["slurm.restart_count"] == "1"  # SLURM's requeue count
    assert run.data.tags["restart_count"] == "1"  # the trainer's count of resumes
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert sorted(steps) == list(range(1, STEPS + 1))


def _debug_keys() -> set[str]:
    import dataclasses

    from pretrain.config import DebugSection

    return {f.name for f in dataclasses.fields(DebugSection)}


FAULTS = {  # name: (the trainer's fault-injection key, overrides)
    # Rank 1 raises an exception at the start of step 2 (a Python error on one rank only).
    "raises": ("raise_at_step", ["debug.raise_at_step=2", "debug.crash_rank=1"]),
    # Rank 1 dies (exit 17) in the middle of saving step 2 while rank 0 waits in a collective.
    "dies_in_save": ("crash_in_save_at_step",
                     ["checkpoint.every=2", "debug.crash_in_save_at_step=2", "debug.crash_rank=1"]),
}


@pytest.mark.timeout(900)
@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_failing_rank_fails_the_job_quickly(slurm_cluster, tiny_shards, workdir, fault):
    key, overrides = FAULTS[fault]
    if key not in _debug_keys():
        pytest.skip(f"the trainer has no fault-injection key debug.{key} (pretrain/config.py DebugSection)")
    job, run_dir, out, _ = submit(workdir, f"failing_{fault}", *overrides, train_index=tiny_shards)
    info = wait_for_job(job, timeout=240, output=out)
    log = tail(out)
    assert info["JobState"] == "FAILED", log
    assert info["ExitCode"] != "0:0" and info["Restarts"] == "0", log
    assert "the ranks failed" in log and "not requeueing" in log, log
    ran_for = slurm_seconds(info["EndTime"]) - slurm_seconds(info["StartTime"])
    assert ran_for < 120, f"the job took {ran_for:.0f} s to fail:\n{log}"
    # No checkpoint of step 2 or later became `latest`.
    assert not (run_dir / "checkpoints" / "latest").exists()


@pytest.mark.timeout(300)
def test_scancel_is_not_undone_by_a_requeue(slurm_cluster, tiny_shards, workdir):
    # scancel sends SIGTERM to the ranks and the batch shell: the ranks checkpoint and exit 0, and
    # the script must not take that for a preemption and requeue the cancelled job.
    job, run_dir, out, _ = submit(workdir, "cancelled", train_index=tiny_shards)
    log_file = run_dir / "train_log.jsonl"
    wait_for(lambda: log_file.exists() and len(log_file.read_text().splitlines()) >= 2, timeout=180,
             what=f"job {job} to train 2 steps ({out})")
    subprocess.run(["scancel", job], check=True, timeout=30)
    wait_for_job(job, timeout=120, output=out)
    time.sleep(3)  # a requeue would show within the scheduler's 2 s cycle
    info = wait_for_job(job, timeout=30, output=out)
    log = tail(out)
    assert info["JobState"] == "CANCELLED" and info["Restarts"] == "0", log
    assert jobcomp_states(job) == ["CANCELLED"], log
    assert "requeueing" not in log.replace("not requeueing", ""), log
    # the batch shell trapped the SIGTERM (without the trap it dies at once and decides nothing)
    assert "SIGTERM: the ranks checkpoint at the next step boundary" in log, log


@pytest.mark.timeout(300)
def test_stop_file_ends_the_run_for_good(slurm_cluster, tiny_shards, workdir):
    # A job (e.g. a requeued one) that starts while RUN_DIR/STOP exists exits at once, without training.
    (workdir / "stopped").mkdir()
    (workdir / "stopped" / "STOP").write_text("")
    job, run_dir, out, _ = submit(workdir, "stopped", train_index=tiny_shards)
    info = wait_for_job(job, timeout=120, output=out)
    assert info["JobState"] == "COMPLETED", tail(out)
    assert "STOP exists: the run was stopped for good; not training" in tail(out)
    assert not (run_dir / "train_log.jsonl").exists()


@pytest.mark.timeout(300)
def test_bad_config_fails_before_launching(slurm_cluster, tiny_shards, workdir):
    job, run_dir, out, _ = submit(workdir, "badconfig", "train.no_such_key=1", train_index=tiny_shards)
    info = wait_for_job(job, timeout=120, output=out)
    log = tail(out)
    assert info["JobState"] == "FAILED", log
    assert "unknown config key 'train.no_such_key'" in log, log
    assert "srun" not in log and not (run_dir / "train_log.jsonl").exists()
