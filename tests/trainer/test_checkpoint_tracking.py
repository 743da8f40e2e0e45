"""Checkpoint directory rules (atomic `latest`, retention, crash debris) and MLflow tracking on a real SQLite store."""
from __future__ import annotations

import os

import pytest

from pretrain.checkpoint import COMPLETE, CheckpointManager, tag_for
from pretrain.tracking import MlflowTracker, default_tracking_uri


class FileWriter:
    """An executor that writes one shard file per save (the engine's part of a checkpoint)."""

    def save(self, root, tag, client_state):
        os.makedirs(os.path.join(root, tag), exist_ok=True)
        with open(os.path.join(root, tag, "shard.bin"), "w") as f:
            f.write(str(client_state))


def save(mgr, step, crash=None):
    return mgr.save(FileWriter(), step, {"step": step}, {"step": step, "model": {}}, "x: 1\n", crash_hook=crash)


def test_retention_keep_last_and_every(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=2, keep_every=20)
    for step in range(5, 65, 5):
        save(mgr, step)
    assert mgr.latest_tag() == tag_for(60)
    assert mgr.complete_tags() == [tag_for(20), tag_for(40), tag_for(55), tag_for(60)]


def test_crash_mid_save_keeps_previous_latest(tmp_path):
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    save(mgr, 10)

    def die(phase):
        if phase == "after_engine_save":
            raise KeyboardInterrupt("simulated crash after the shard files, before `latest`")

    with pytest.raises(KeyboardInterrupt):
        save(mgr, 20, crash=die)
    assert mgr.latest_tag() == tag_for(10)
    assert not os.path.exists(tmp_path / tag_for(20) / COMPLETE)
    assert mgr.read_meta(mgr.latest_tag())["step"] == 10
    # Saving the same step again after a restart completes it; debris older than latest is pruned.
    save(mgr, 20)
    assert mgr.latest_tag() == tag_for(20) and mgr.complete_tags() == [tag_for(10), tag_for(20)]
    os.makedirs(tmp_path / tag_for(15))  # a partial save that never completed
    save(mgr, 30)
    assert not os.path.exists(tmp_path / tag_for(15))


def test_resaving_a_crashed_step_leaves_no_stale_shards(tmp_path):
    """A crashed save of step 40 by more ranks (before a reshard) left an extra shard file; saving
    step 40 again must not mark that folder complete with the stale file still in it."""
    mgr = CheckpointManager(str(tmp_path), keep_last=3)
    save(mgr, 30)
    os.makedirs(tmp_path / tag_for(40))
    (tmp_path / tag_for(40) / "zero_pp_rank_2_mp_rank_00_optim_states.pt").write_text("stale")
    save(mgr, 40)
    assert mgr.latest_tag() == tag_for(40)
    assert (tmp_path / tag_for(40) / "shard.bin").exists() and (tmp_path / tag_for(40) / COMPLETE).exists()
    assert not (tmp_path / tag_for(40) / "zero_pp_rank_2_mp_rank_00_optim_states.pt").exists()


@pytest.mark.slow
def test_mlflow_tracker_buffers_and_resumes_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = default_tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    t = MlflowTracker(uri, "unit", flush_every=5)
    t.log_params({"config": {"a": 1, "b": [1, 2]}, "world_size": 2})
    t.log_artifact_text("config.yaml", "a: 1\n")
    for step in range(1, 8):
        t.log({"train/loss": 1.0 / step, "train/compression/stage0": 4.0}, step)
    # 5 steps handed to the sender by count, 2 still buffered
    assert t.wait_sent()
    hist = t.client.get_metric_history(t.run_id, "train/loss")
    assert [m.step for m in hist] == [1, 2, 3, 4, 5]
    t.flush(wait=True)
    assert len(t.client.get_metric_history(t.run_id, "train/loss")) == 7
    t.finish("KILLED")
    run_id = t.run_id

    r = MlflowTracker(uri, "unit", run_id=run_id, resume_step=5)
    r.log_params({"config": {"a": 1, "b": [1, 2]}, "world_size": 2, "new": 3})  # re-logging is fine
    r.log({"train/loss": 0.01}, 8)
    r.finish()
    run = r.client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["restart_count"] == "1" and run.data.tags["slurm.job_id"] == "777"
    assert run.data.tags["restart_1.from_step"] == "5"
    # Where each attempt ran stays readable after later attempts moved elsewhere.
    assert run.data.tags["restart_0.slurm.job_id"] == "777" and run.data.tags["restart_1.slurm.job_id"] == "777"
    assert run.data.params["config.a"] == "1" and run.data.params["new"] == "3"
    assert [m.step for m in r.client.get_metric_history(run_id, "train/loss")] == list(range(1, 9))
    assert [a.path for a in r.client.list_artifacts(run_id)] == ["config.yaml"]
    # a checkpoint that carries no run id (tracking was off then): a new run that says where it starts
    n = MlflowTracker(uri, "unit", resume_step=40)
    n.finish()
    tags = n.client.get_run(n.run_id).data.tags
    assert n.run_id != run_id and tags["restart_count"] == "0" and tags["resumed_from_step"] == "40"


class Counter:
    """A registered piece of state."""

    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


class ClientStore(FileWriter):
    """Storage that keeps the client state it was given, as DeepSpeed does in its shard files."""

    def save(self, root, tag, client_state):
        super().save(root, tag, client_state)
        self.saved = {**getattr(self, "saved", {}), tag: client_state}

    def load(self, root, tag, universal=False):
        return self.saved[tag]


def test_registered_state_is_saved_and_restored(tmp_path):
    store = ClientStore()
    mgr = CheckpointManager(str(tmp_path))
    mgr.register_storage(store)
    a, b = Counter(3), Counter(7)
    mgr.register("a", a)
    mgr.register("b", b)
    with pytest.raises(ValueError, match="registered twice"):
        mgr.register("a", Counter())
    tag = mgr.save_registered(5, {"step": 5, "model": {}}, "x: 1\n")
    a.value, b.value = 100, 200
    mgr.restore(tag)
    assert (a.value, b.value) == (3, 7)

    # a trainer that registers one more piece refuses a checkpoint without it, naming it
    later = CheckpointManager(str(tmp_path))
    later.register_storage(store)
    later.register("a", Counter())
    later.register("pipeline", Counter())
    from pretrain.errors import TrainingError

    with pytest.raises(TrainingError, match="pipeline"):
        later.restore(tag)


def test_resume_point_refuses_another_model(tmp_path):
    from pretrain.errors import TrainingError

    mgr = CheckpointManager(str(tmp_path))
    assert mgr.resume_point({"d_model": [32, 48]}, "deepspeed") == (None, None)
    mgr.save(FileWriter(), 4, {}, {"step": 4, "model": {"d_model": [32, 48], "ratio_targets": [4.0]},
                                   "engine": "deepspeed"}, "x: 1\n")
    tag, meta = mgr.resume_point({"d_model": [32, 48], "ratio_targets": [3.0]}, "deepspeed")  # targets may change
    assert tag == tag_for(4) and meta["step"] == 4
    with pytest.raises(TrainingError, match=r"model.d_model: checkpoint \[32, 48\] vs requested \[32, 64\]"):
        mgr.resume_point({"d_model": [32, 64]}, "deepspeed")
    with pytest.raises(TrainingError, match="train.engine='deepspeed'"):
        mgr.resume_point({"d_model": [32, 48]}, "plain")
