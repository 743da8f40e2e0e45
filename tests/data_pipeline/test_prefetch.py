"""PrefetchingLoader: the next step is built in a background thread, and the state of a checkpoint
is that of the consumed steps only (the batch being built is not consumed)."""
from __future__ import annotations

import json
import os
import tarfile
import threading

import pytest

from data_pipeline import BalancedStepLoader, DataError, PrefetchingLoader

from dp_testutil import lognormal_docs, step_digest, write_shard_set

C, STEP = 1024, 3000


@pytest.fixture
def index(tmp_path):
    path, _ = write_shard_set(str(tmp_path), lognormal_docs(120, seed=3, mean=5.0), docs_per_shard=20)
    return path


def _digests(it, n):
    return [step_digest(next(it)) for _ in range(n)]


def test_same_steps_and_exact_resume_from_the_consumed_state(index):
    plain = iter(BalancedStepLoader([index], C, STEP, seed=1))
    expected = _digests(plain, 6)
    loader = PrefetchingLoader(BalancedStepLoader([index], C, STEP, seed=1))
    it = iter(loader)
    assert _digests(it, 3) == expected[:3]
    state = loader.state_dict()  # step 4 is being built (or built) in the background by now
    assert state["steps"] == 3
    assert _digests(it, 3) == expected[3:]
    loader.close()
    resumed = PrefetchingLoader(BalancedStepLoader([index], C, STEP, seed=1))
    resumed.load_state_dict(state)
    assert _digests(iter(resumed), 3) == expected[3:]
    resumed.close()


class _Recorder:
    """A loader of numbered steps whose 'cost model' records the updates applied before each build."""

    def __init__(self):
        self.applied, self.built, self.n = [], [], 0
        self.cost_model = None

    def __iter__(self):
        while True:
            self.n += 1
            self.built.append((self.n, list(self.applied)))
            yield self.n

    def state_dict(self):
        return {"n": self.n, "applied": list(self.applied)}

    def load_state_dict(self, state):
        self.n, self.applied = state["n"], list(state["applied"])

    def close(self):
        pass


def _apply(inner, payload):
    inner.applied.append(payload)


def _run(loader, steps, resume_at=None):
    """Steps 1..steps with an update asked for after each; returns {step: updates its build saw}."""
    it = iter(loader)
    for step in range(1, steps + 1):
        assert next(it) == step
        loader.update(f"after {step}")
        if step == resume_at:
            return loader.state_dict()
    loader.settle()
    return dict(loader.loader.built)


def test_updates_reach_the_step_after_next_and_survive_a_resume():
    seen = _run(PrefetchingLoader(_Recorder(), _apply), 5)
    assert seen[3] == ["after 1"] and seen[5] == ["after 1", "after 2", "after 3"]
    state = _run(PrefetchingLoader(_Recorder(), _apply), 5, resume_at=2)
    assert state["prefetch_pending_updates"] == ["after 2"] and state["n"] == 2
    resumed = PrefetchingLoader(_Recorder(), _apply)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for step in (3, 4, 5):
        assert next(it) == step
        resumed.update(f"after {step}")
    resumed.settle()
    assert {k: v for k, v in resumed.loader.built if k <= 5} == {k: seen[k] for k in (3, 4, 5)}


def test_an_error_in_the_builder_reaches_the_trainer_unchanged(tmp_path):
    path, _ = write_shard_set(str(tmp_path), lognormal_docs(40, seed=5, mean=5.0), docs_per_shard=10)
    meta = json.loads(open(path).read())
    broken = os.path.join(tmp_path, meta["shards"][1]["path"])
    with tarfile.open(broken) as tar:
        cut = tar.getmembers()[5].offset_data + 1
    data = open(broken, "rb").read()
    open(broken, "wb").write(data[:cut])
    loader = PrefetchingLoader(BalancedStepLoader([path], C, STEP, epochs=1, on_error="fail"))
    with pytest.raises(DataError, match=r"shard-000001\.tar"):
        for _ in loader:
            pass
    loader.close()


def test_close_stops_the_builder_and_the_end_ends(index):
    loader = PrefetchingLoader(BalancedStepLoader([index], C, STEP, epochs=1))
    n = sum(1 for _ in loader)
    assert n > 1
    loader.close()
    loader = PrefetchingLoader(BalancedStepLoader([index], C, STEP))
    it = iter(loader)
    next(it)  # the next step is being built now
    loader.close()
    assert not [t for t in threading.enumerate() if t.name == "batch-prefetch"]
