"""`python -m pretrain.compare` on two real training runs in one SQLite store, one of them
SIGKILLed after its step-4 checkpoint (it had logged steps 5 and 6) and resumed once."""
from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import pytest

from trainer_harness import PY, Ranks, base_env, kill_when_hanging, read_log, run_ranks, train_argv

pytestmark = pytest.mark.slow

STEPS = 10


def args(run_dir: Path, shards: dict, db: Path, *extra: str) -> list[str]:
    return [f"run_dir={run_dir}", f"data.train_index=[{shards['train']}]", f"data.eval_index=[{shards['val']}]",
            f"train.steps={STEPS}", "train.engine=plain", "checkpoint.every=4", "train.log_every=1",
            "train.eval_every=4", "train.eval_max_steps=2", f"tracking.uri=sqlite:///{db}",
            "tracking.experiment=compare", "tracking.flush_every=1", *extra]


@pytest.fixture(scope="module")
def store(tmp_path_factory, demo_shards) -> dict:
    base = tmp_path_factory.mktemp("compare")
    db = base / "mlflow.db"
    straight = base / "straight"
    (base / "straight_logs").mkdir()
    run_ranks(train_argv(*args(straight, demo_shards, db, "tracking.run_name=straight")), 1, base,
              log_dir=base / "straight_logs", timeout=240)
    resumed = base / "resumed"
    logs = base / "kill_logs"
    logs.mkdir()
    ranks = Ranks(train_argv(*args(resumed, demo_shards, db, "tracking.run_name=resumed", "train.seed=1",
                                   "debug.hang_at_step=6")), 1, base, log_dir=logs)
    kill_when_hanging(ranks, 6)
    logs2 = base / "resume_logs"
    logs2.mkdir()
    run_ranks(train_argv(*args(resumed, demo_shards, db, "tracking.run_name=resumed", "train.seed=1")), 1, base,
              log_dir=logs2, timeout=240)
    return {"db": db, "straight": straight, "resumed": resumed, "base": base}


def compare(store: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "pretrain.compare", "--tracking-uri", f"sqlite:///{store['db']}", *extra],
                          cwd=store["base"], env=base_env(), capture_output=True, text=True, timeout=180)


def test_table_plots_and_report(store, tmp_path):
    out = tmp_path / "cmp"
    res = compare(store, "--experiment", "compare", "--metrics", "train/loss", "eval/bpb", "no/such_metric",
                  "--x", "active", "--smooth", "0.6", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "no metric 'no/such_metric'" in res.stderr and "straight" in res.stderr, res.stderr
    rows = list(csv.DictReader((out / "table.csv").open()))
    by_name = {r["run"]: r for r in rows}
    assert set(by_name) == {"straight", "resumed"}
    assert by_name["resumed"]["restarts"] == "1" and by_name["straight"]["restarts"] == "0"
    assert {by_name["straight"]["config.train.seed"], by_name["resumed"]["config.train.seed"]} == {"0", "1"}
    assert "config.optim.lr" not in rows[0], "params equal across runs must not be in the table"
    for r in rows:
        assert r["last_step"] == str(STEPS) and float(r["final eval/bpb"]) > 0 and r["final train/compression/stage0"]
        assert float(r["active_s"]) <= float(r["wall_s"])
    assert float(by_name["resumed"]["active_s"]) < float(by_name["resumed"]["wall_s"]), \
        "the gap between the kill and the restart is not active time"
    assert (out / "train_loss.png").stat().st_size > 1000 and (out / "eval_bpb.png").is_file()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "<script" not in page
    assert "config.train.seed" in page and "replaced" in page


def test_resumed_run_is_one_line_with_the_values_it_continued_from(store):
    from mlflow.tracking import MlflowClient

    from pretrain import compare as cmp

    uri = f"sqlite:///{store['db']}"
    client = MlflowClient(tracking_uri=uri)
    runs = cmp.run_data(client, cmp.select_runs(client, ["compare"], [], ["resumed"], ""))
    cmp.read_histories(client, uri, runs, ["train/loss"])
    (run,) = runs
    loss = run.series["train/loss"]
    assert list(loss.step) == list(range(1, STEPS + 1)), "one point per step"
    raw = client.get_metric_history(run.run_id, "train/loss")
    assert len(raw) == STEPS + 2, f"the killed attempt should have logged steps 5 and 6 twice: {len(raw)} points"
    assert run.replaced == 2
    final = {r["step"]: r["loss"] for r in read_log(store["resumed"]) if "loss" in r}  # the last record per step
    assert [round(v, 6) for v in loss.value] == [round(final[s], 6) for s in range(1, STEPS + 1)]


def test_filter_with_backticks_and_a_bad_filter(store, tmp_path):
    res = compare(store, "--filter", "params.`config.train.seed` = '1'", "--out", str(tmp_path / "one"))
    assert res.returncode == 0, res.stderr
    rows = list(csv.DictReader((tmp_path / "one" / "table.csv").open()))
    assert [r["run"] for r in rows] == ["resumed"]
    res = compare(store, "--filter", "metrics.train/loss >>> 3", "--out", str(tmp_path / "bad"))
    assert res.returncode == 2 and "--filter" in res.stderr and "backticks" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_group_by_a_param_and_log_back_to_mlflow(store, tmp_path):
    res = compare(store, "--experiment", "compare", "--group-by", "config.train.seed", "--x", "bytes",
                  "--log-to-mlflow", "comparisons", "--out", str(tmp_path / "g"))
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "g" / "train_loss.png").is_file()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store['db']}")
    (run,) = client.search_runs([client.get_experiment_by_name("comparisons").experiment_id])
    assert "report.html" in {a.path for a in client.list_artifacts(run.info.run_id)}
    res = compare(store, "--experiment", "compare", "--group-by", "config.no.such", "--out", str(tmp_path / "h"))
    assert res.returncode == 2 and "config.no.such" in res.stderr


def test_a_store_that_is_not_there_is_named_and_not_created(tmp_path):
    db = tmp_path / "mistyped.db"
    res = compare({"db": db, "base": tmp_path}, "--experiment", "hnet-pretrain", "--out", str(tmp_path / "cmp"))
    assert res.returncode == 2 and f"no MLflow store at sqlite:///{db}" in res.stderr, res.stderr
    assert not db.exists(), "opening would have created an empty store"


def test_stage_columns_come_from_the_resolved_model():
    from pretrain.compare import RunData, _stage_metrics

    def run(params):
        return RunData("id", "r", "e", "FINISHED", 0, None, params, {})

    # a config that leaves the targets to its public JSON logs config.model.ratio_targets as null
    two = run({"config.model.ratio_targets": "null", "model_resolved.ratio_targets": "[3.0, 3.0]"})
    assert _stage_metrics([two]) == ["train/compression/stage0", "train/compression/stage1"]
    assert _stage_metrics([run({"config.model.ratio_targets": "[4.0]"})]) == ["train/compression/stage0"]
