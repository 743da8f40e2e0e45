"""A resumed run whose settings changed says so, each of them: in the log and as MLflow tags of
the run it continues (the learning rate must not move silently, nor the precision)."""
from __future__ import annotations

import pytest

from trainer_harness import run_ranks, train_argv

pytestmark = pytest.mark.slow


def test_changed_settings_logged_and_tagged(tmp_path, demo_shards):
    from mlflow.tracking import MlflowClient

    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    base = [f"run_dir={run_dir}", f"data.train_index=[{demo_shards['train']}]", "train.engine=plain",
            f"tracking.uri=sqlite:///{db}", "tracking.experiment=changes"]
    run_ranks(train_argv(*base, "train.steps=4"), 1, tmp_path, log_dir=tmp_path, timeout=240)
    (tmp_path / "second").mkdir()
    _, out = run_ranks(train_argv(*base, "train.steps=6", "optim.lr=0.001", "data.num_workers=0",
                                  "data.prefetch=false"), 1, tmp_path, log_dir=tmp_path / "second", timeout=240)
    assert "resumed with a changed setting: train.steps 4 -> 6 (the schedule follows" in out, out
    assert "optim.lr 0.003 -> 0.001" in out, out
    # any other setting too (a forgotten train.precision=bf16 would otherwise go unnoticed)
    assert "resumed with a changed setting: data.prefetch True -> False\n" in out, out
    assert "data.num_workers" not in out, "an unchanged setting is not reported"
    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    (run,) = client.search_runs([client.get_experiment_by_name("changes").experiment_id])
    assert run.data.tags["resume_step_4.changed.optim.lr"] == "0.003 -> 0.001"
    assert run.data.tags["resume_step_4.changed.train.steps"] == "4 -> 6"
    assert run.data.tags["resume_step_4.changed.data.prefetch"] == "True -> False"
