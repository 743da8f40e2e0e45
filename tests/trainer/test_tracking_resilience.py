"""Tracking never stops training (pretrain/tracking.py): a store that cannot be reached, a store
that locks up mid-run (the steps do not wait for it), and two runs writing one SQLite store at
once. Real stores, real runs (plain engine, one process each)."""
from __future__ import annotations

import contextlib
import json
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from trainer_harness import PY, Ranks, base_env, run_ranks, train_argv

pytestmark = pytest.mark.slow

STEPS = 16


def args(run_dir: Path, shards: dict, uri: str, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.train_index=[{shards['train']}]", f"train.steps={STEPS}",
            "train.engine=plain", "train.log_every=4", f"tracking.uri={uri}", "tracking.flush_every=1",
            "tracking.experiment=resilience", *extra]


def steps_of(uri: str, run_id: str, metric: str = "train/loss") -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, metric))


def replay(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pretrain.tracking", "replay", str(run_dir), *extra], cwd=run_dir.parent,
                          env=base_env(), capture_output=True, text=True, timeout=120)


def test_unreachable_server_run_completes_and_replays(tmp_path, demo_shards):
    run_dir = tmp_path / "run"
    env = base_env({"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"})
    codes, out = run_ranks(train_argv(*args(run_dir, demo_shards, "http://127.0.0.1:9")), 1, tmp_path,
                           env=env, log_dir=tmp_path, timeout=240)
    assert codes == [0]
    assert "cannot open MLflow store http://127.0.0.1:9" in out and "pretrain.tracking replay" in out
    assert (run_dir / "unsent_metrics.jsonl").is_file()
    store = f"sqlite:///{tmp_path / 'later.db'}"
    res = replay(run_dir, "--tracking-uri", store)
    assert res.returncode == 0, res.stderr
    run_id = res.stdout.split("MLflow run ")[1].split()[0]
    assert steps_of(store, run_id) == list(range(1, STEPS + 1))
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=store).get_run(run_id)
    assert run.data.params["config.train.steps"] == str(STEPS) and run.info.status == "FINISHED"
    assert replay(run_dir).returncode == 2, "a replayed file is not sent twice"


def test_store_locked_mid_run_completes_then_replays(tmp_path, demo_shards):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    run_dir = tmp_path / "run"
    ranks = Ranks(train_argv(*args(run_dir, demo_shards, uri, "tracking.max_failures=2", "train.steps=40")), 1,
                  tmp_path, log_dir=tmp_path)
    lock = None
    try:
        deadline = time.time() + 180
        log = run_dir / "train_log.jsonl"
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 4):
            assert ranks.procs[0].poll() is None, ranks.output()
            time.sleep(0.2)
        lock = sqlite3.connect(db, timeout=60, isolation_level=None)
        lock.execute("BEGIN EXCLUSIVE")  # every write of the run now fails with "database is locked"
        assert ranks.wait(400) == [0], ranks.output()
    finally:
        if lock is not None:
            lock.execute("ROLLBACK")
            lock.close()
        ranks.kill()
    out = ranks.output(20000)
    assert "sending metrics" in out and "tracking is offline" in out, out[-3000:]
    # A send waits 20 s on the lock (MLflow's SQLite busy timeout) before it fails; the steps go on
    # meanwhile: the first failure is reported after later steps' lines, not right after step 4's.
    assert out.index("[train] step 16/40") < out.index("sending metrics"), out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    res = replay(run_dir)
    assert res.returncode == 0, res.stderr
    assert steps_of(uri, summary["mlflow_run_id"]) == list(range(1, 41)), "every step exactly once"


def test_two_runs_share_one_sqlite_store(tmp_path, demo_shards):
    uri = f"sqlite:///{tmp_path / 'shared.db'}"
    runs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        runs.append(Ranks(train_argv(*args(tmp_path / name / "run", demo_shards, uri, f"tracking.run_name={name}")),
                          1, tmp_path / name, log_dir=tmp_path / name))
    try:
        for r in runs:
            assert r.wait(300) == [0], r.output()
    finally:
        for r in runs:
            r.kill()
    for name in ("a", "b"):
        summary = json.loads((tmp_path / name / "run" / "summary.json").read_text())
        assert steps_of(uri, summary["mlflow_run_id"]) == list(range(1, STEPS + 1))
        assert not (tmp_path / name / "run" / "unsent_metrics.jsonl").exists()


OPENER = """
import sys
import mlflow.tracking  # noqa: F401 - imported before the "go", so that the opens start together
from pretrain.tracking import open_client
print("ready", flush=True)
sys.stdin.readline()  # every process is imported and waiting: open the store together
client, exp_id = open_client(sys.argv[1], "shared")
print("exp", exp_id, flush=True)
"""


def test_processes_opening_a_fresh_sqlite_store_at_once_leave_it_whole(tmp_path):
    """Jobs that start together on a new store: each opens it (MLflow builds the schema as the
    client is made) and asks for one experiment. Without the open lock most such starts failed
    here and left _alembic_tmp_* tables behind, which break every later reader."""
    db = tmp_path / "fresh.db"
    procs = [subprocess.Popen([PY, "-c", OPENER, f"sqlite:///{db}"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=base_env()) for _ in range(3)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0] * 3, [err[-2000:] for _, err in results]
    exp_ids = {out.split()[-1] for out, _ in results}
    assert len(exp_ids) == 1, exp_ids
    with contextlib.closing(sqlite3.connect(db)) as con:
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert not {t for t in tables if t.startswith("_alembic_tmp")}, tables
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    assert client.get_experiment_by_name("shared").experiment_id in exp_ids


def test_resumed_against_a_store_without_its_run_logs_to_a_new_run_that_names_it(tmp_path, demo_shards):
    # The store answers but lacks the checkpoint's run (the working directory, tracking.uri or
    # $MLFLOW_TRACKING_URI changed): a new run there, not a whole run offline
    run_dir = tmp_path / "run"
    first, second = f"sqlite:///{tmp_path / 'first.db'}", f"sqlite:///{tmp_path / 'second.db'}"
    _, out = run_ranks(train_argv(*args(run_dir, demo_shards, first)), 1, tmp_path, log_dir=tmp_path, timeout=240)
    old_id = out.split("MLflow run ")[1].split()[0]
    _, out = run_ranks(train_argv(*args(run_dir, demo_shards, second, f"train.steps={STEPS + 4}")), 1, tmp_path,
                       log_dir=tmp_path, timeout=240)
    assert f"MLflow run {old_id} of this checkpoint is not in {second}" in out, out
    assert "offline" not in out and not (run_dir / "unsent_metrics.jsonl").exists(), out
    new_id = out.split("MLflow run ")[-1].split()[0]
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=second).get_run(new_id)
    assert run.data.tags["continues_run_id"] == old_id and run.data.tags["resumed_from_step"] == str(STEPS)
    assert steps_of(second, new_id) == list(range(STEPS + 1, STEPS + 5))
    assert steps_of(first, old_id) == list(range(1, STEPS + 1))


def test_replay_skips_a_torn_last_line_and_goes_on_after_a_failure(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from pretrain.tracking import UNSENT_FILE, OfflineLog, _Metric, replay as replay_file

    run_dir, store = tmp_path / "run", f"sqlite:///{tmp_path / 'm.db'}"
    log = OfflineLog(str(run_dir), None, store)  # what a run that never reached its store writes
    log.write({"kind": "open", "experiment": "replays", "resume_step": None, "run_name": "run"})
    for step in range(1, 7):
        log.metrics([_Metric("train/loss", 1.0 / step, 1000 + step, step)])
    log.write({"kind": "status", "status": "FINISHED"})
    with open(run_dir / UNSENT_FILE, "a") as f:
        f.write('{"run_id": null, "kind": "metr')  # killed while appending
    sends = []
    real = MlflowClient.log_batch

    def failing_fourth(self, *a, **kw):  # the store goes away after three sends
        sends.append(1)
        if len(sends) == 4:
            raise ConnectionError("store went away")
        return real(self, *a, **kw)

    monkeypatch.setattr(MlflowClient, "log_batch", failing_fourth)
    warnings = []
    with pytest.raises(ConnectionError):
        replay_file(str(run_dir), warn=warnings.append)
    assert any("torn last line" in w for w in warnings)
    monkeypatch.setattr(MlflowClient, "log_batch", real)
    run_id, sent = replay_file(str(run_dir), warn=warnings.append)
    assert sent == 3, "the three values sent before the failure are not sent again"
    client = MlflowClient(tracking_uri=store)
    assert [m.step for m in client.get_metric_history(run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    exp = client.get_experiment_by_name("replays")
    assert len(client.search_runs([exp.experiment_id])) == 1, "the second replay continues the run the first made"
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not (run_dir / UNSENT_FILE).exists()


def test_store_file_removed_mid_run_completes(tmp_path, demo_shards):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    run_dir = tmp_path / "run"
    ranks = Ranks(train_argv(*args(run_dir, demo_shards, uri, "tracking.max_failures=2", "train.steps=30")), 1,
                  tmp_path, log_dir=tmp_path)
    try:
        deadline = time.time() + 180
        log = run_dir / "train_log.jsonl"
        while time.time() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 4):
            assert ranks.procs[0].poll() is None, ranks.output()
            time.sleep(0.2)
        db.unlink()  # a cleanup job, a user: the store's file is gone while the run writes to it
        assert ranks.wait(400) == [0], ranks.output()
    finally:
        ranks.kill()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", ranks.output()
    out = ranks.output(20000)
    assert "tracking is offline for the rest of this run" in out, out[-3000:]  # SQLite: "readonly database"
    # What the removed store never took is kept; replayed into another store, which lacks the run,
    # it becomes a new run that names the old one
    later = f"sqlite:///{tmp_path / 'later.db'}"
    res = replay(run_dir, "--tracking-uri", later)
    assert res.returncode == 0 and f"MLflow run {summary['mlflow_run_id']} is not in {later}" in res.stdout, \
        res.stdout + res.stderr
    new_id = res.stdout.split("into MLflow run ")[1].split()[0]
    from mlflow.tracking import MlflowClient

    assert MlflowClient(tracking_uri=later).get_run(new_id).data.tags["continues_run_id"] == summary["mlflow_run_id"]
    replayed = steps_of(later, new_id)
    assert replayed and replayed[-1] == 30 and replayed == list(range(replayed[0], 31)), replayed
