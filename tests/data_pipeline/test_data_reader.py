"""Stateful reader in one process: every document once per epoch, exact resume, bad data."""
from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
import time
from collections import Counter

import pytest
from dp_testutil import lognormal_docs, reassemble, step_digest, write_shard_set

from data_pipeline import BalancedStepLoader, DataError

C, STEP = 1024, 4096


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    return write_shard_set(str(d), lognormal_docs(160, seed=3), docs_per_shard=20)  # 8 shards


def _collect(loader, n=None):
    steps = []
    for step in loader:
        steps.append(step)
        if n is not None and len(steps) == n:
            break
    return steps


def _mbs(steps):
    return [mb for s in steps for mb in s.micro_batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_each_document_once_per_epoch(shard_set, workers):
    index, expected = shard_set
    loader = BalancedStepLoader([index], C, STEP, num_workers=workers, epochs=1, seed=7)
    steps = _collect(loader)
    assert reassemble(_mbs(steps)) == expected
    assert loader.state_dict()["finished"]
    assert list(loader) == []  # a finished loader stays finished


def test_epochs_reshuffle_and_repeat(shard_set):
    index, expected = shard_set
    steps = _collect(BalancedStepLoader([index], C, STEP, num_workers=2, epochs=2, seed=7))
    starts = Counter(k for mb in _mbs(steps) for k in mb.keys if "@" not in k)
    assert set(starts) == set(expected) and set(starts.values()) == {2}
    order = [k for mb in _mbs(steps) for k in mb.keys if "@" not in k]
    half = len(order) // 2
    assert order[:half] != order[half:]  # a new seeded order in epoch 1


def test_exact_resume_in_process_with_workers(shard_set):
    index, _ = shard_set
    ref = BalancedStepLoader([index], C, STEP, num_workers=2, seed=1)
    full = [step_digest(s) for s in _collect(ref, 60)]  # crosses the epoch boundary (~45 steps/epoch)
    states = {}
    first = BalancedStepLoader([index], C, STEP, num_workers=2, seed=1)
    for i, _s in enumerate(first, 1):
        if i in (5, 43):
            states[i] = pickle.loads(pickle.dumps(first.state_dict()))
        if i == 43:
            break
    first.close()
    for k, state in states.items():
        resumed = BalancedStepLoader([index], C, STEP, num_workers=2, seed=1)
        resumed.load_state_dict(state)
        got = [step_digest(s) for s in _collect(resumed, 12)]
        assert got == full[k:k + 12], f"resume from step {k} differs"
    assert ref.epoch >= 1


@pytest.mark.parametrize("new_workers", [0, 3])
def test_resume_with_other_worker_count_repeats_nothing(shard_set, new_workers):
    index, expected = shard_set
    a = BalancedStepLoader([index], C, STEP, num_workers=2, epochs=1, seed=2)
    first = _collect(a, 9)
    state = a.state_dict()
    a.close()
    b = BalancedStepLoader([index], C, STEP, num_workers=new_workers, epochs=1, seed=2)
    b.load_state_dict(state)
    rest = _collect(b)
    assert reassemble(_mbs(first) + _mbs(rest)) == expected


def test_state_checks(shard_set, tmp_path):
    index, _ = shard_set
    state = BalancedStepLoader([index], C, STEP, seed=1).state_dict()
    json.dumps({k: v for k, v in state.items() if k != "carry"})  # plain data
    with pytest.raises(ValueError, match="seed"):
        BalancedStepLoader([index], C, STEP, seed=2).load_state_dict(state)
    other, _ = write_shard_set(str(tmp_path / "o"), lognormal_docs(10, seed=9), docs_per_shard=5)
    with pytest.raises(ValueError, match="different shard list"):
        BalancedStepLoader([other], C, STEP, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of round_to"):
        BalancedStepLoader([index], 1000, STEP, round_to=64)


# ------------------------------------------------------------------ bad data

def _damage(tmp_path, docs_per_shard=10, n=40):
    index, expected = write_shard_set(str(tmp_path), lognormal_docs(n, seed=5, mean=5.0), docs_per_shard)
    meta = json.loads(open(index).read())
    truncated = os.path.join(tmp_path, meta["shards"][1]["path"])
    with tarfile.open(truncated) as tar:
        cut = tar.getmembers()[docs_per_shard // 2].offset_data + 1  # inside the 6th document
    data = open(truncated, "rb").read()
    with open(truncated, "wb") as f:
        f.write(data[:cut])
    missing = os.path.join(tmp_path, meta["shards"][2]["path"])
    os.remove(missing)
    return index, expected


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_and_missing_shards_skip(tmp_path, workers, caplog):
    index, expected = _damage(tmp_path)
    loader = BalancedStepLoader([index], C, STEP, num_workers=workers, epochs=1)
    with caplog.at_level("WARNING", logger="data_pipeline"):
        got = reassemble(_mbs(_collect(loader)))
    st = loader.state_dict()
    assert st["skipped_shards"] == 1  # the missing one
    lost_from_truncated = st["skipped_docs"]
    assert lost_from_truncated == 5  # documents 6..10 of the truncated shard
    good = {k: v for k, v in expected.items() if not k.startswith(("shard-000001", "shard-000002"))}
    assert {k: got[k] for k in good} == good  # intact shards entirely read
    assert not [k for k in got if k.startswith("shard-000002")]
    assert len([k for k in got if k.startswith("shard-000001")]) == 10 - lost_from_truncated
    assert all(got[k] == expected[k] for k in got)  # what came from the broken shard is intact
    assert "shard-000002.tar" in caplog.text and "shard-000001.tar" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_corrupt_and_missing_shards_fail(tmp_path, workers):
    index, _ = _damage(tmp_path)
    loader = BalancedStepLoader([index], C, STEP, num_workers=workers, epochs=1, on_error="fail")
    t0 = time.monotonic()
    with pytest.raises(DataError, match=r"shard-00000[12]\.tar"):
        _collect(loader)
    assert time.monotonic() - t0 < 30


def test_empty_document_and_member_without_text(tmp_path):
    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [("a.bin", b"good one"), ("b.bin", b""), ("c.json", b"{}"), ("d.txt", b"good two")]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "index.json").write_text(json.dumps({"shards": [{"path": path.name, "samples": 4}]}))
    index = str(tmp_path / "index.json")
    loader = BalancedStepLoader([index], 64, 128, epochs=1)
    got = reassemble(_mbs(_collect(loader)))
    assert got == {"shard-000000.tar:a": b"good one", "shard-000000.tar:d": b"good two"}
    assert loader.state_dict()["skipped_docs"] == 2
    with pytest.raises(DataError, match=r"shard-000000\.tar key b: empty document"):
        _collect(BalancedStepLoader([index], 64, 128, epochs=1, on_error="fail"))


def test_killed_worker_restarts_once_from_its_exact_position(shard_set):
    """kill -9 of a data worker mid-epoch (OOM killer, an operator): the stream restarts right
    after the last event the worker delivered, and the steps equal an uninterrupted run's.
    prefetch=1 with shared-memory slots keeps the worker at most a slot ahead, so it is mid-stream
    when killed (through a pipe, the whole small corpus would fit in the pipe's buffer)."""
    index, _ = shard_set
    kw = dict(num_workers=2, prefetch=1, epochs=2, seed=11)
    ref = [step_digest(s) for s in BalancedStepLoader([index], C, STEP, **kw)]
    loader = BalancedStepLoader([index], C, STEP, **kw)
    got = []
    for i, step in enumerate(loader):
        got.append(step_digest(step))
        if i == 2:
            client = loader._clients[1]
            proc = client._proc
            assert proc.poll() is None, "the worker had already ended: the kill would test nothing"
            proc.kill()
            proc.wait(5)
    assert client._restarted and client._proc is not proc
    assert got == ref


def test_worker_that_dies_twice_surfaces(shard_set):
    index, _ = shard_set
    loader = BalancedStepLoader([index], C, STEP, num_workers=1, prefetch=1)
    it = iter(loader)
    next(it)
    first = loader._clients[0]._proc
    first.kill()
    first.wait(5)
    t0 = time.monotonic()
    with pytest.raises((RuntimeError, DataError), match="died .*restarted once already"):
        for _ in range(1000):
            next(it)
            proc = loader._clients[0]._proc
            if proc is not first and proc.poll() is None:
                proc.kill()  # the restarted worker dies as well
                proc.wait(5)
    assert time.monotonic() - t0 < 30


def test_pipe_url_shards(shard_set, tmp_path):
    """Shards named by a `pipe:` URL (how object stores are read on clusters)."""
    index, expected = shard_set
    meta = json.loads(open(index).read())
    base = os.path.dirname(index)
    for e in meta["shards"]:
        e["path"] = f"pipe:cat {os.path.join(base, e['path'])}"
    (tmp_path / "index.json").write_text(json.dumps(meta))
    got = reassemble(_mbs(_collect(BalancedStepLoader([str(tmp_path / "index.json")], C, STEP, epochs=1,
                                                      allow_pipe_urls=True))))
    assert sorted(got.values()) == sorted(expected.values())
    # without the opt-in a pipe: URL (a shell command) is refused, naming the shard
    with pytest.raises(DataError, match="pipe:cat .*allow_pipe_urls"):
        BalancedStepLoader([str(tmp_path / "index.json")], C, STEP, epochs=1)


def test_worker_transports_give_the_same_stream(tmp_path):
    """Documents handed over in shared-memory slots: the same steps as pickled through the pipe
    (two streams, so not the in-process order). prefetch=1 makes the worker wait
    for its one slot to be freed before every batch; a 1.28 MB document is larger than a slot and
    travels in the pickle."""
    docs = lognormal_docs(120, seed=5)
    docs.insert(60, bytes(range(256)) * 5000)  # 1.28 MB
    index, _ = write_shard_set(str(tmp_path), docs, docs_per_shard=11)
    ref = [step_digest(s) for s in BalancedStepLoader([index], C, STEP, num_workers=2, epochs=2, seed=4,
                                                      shared_memory=False)]
    assert len(ref) > 2 * 1_280_000 // STEP
    for kw in (dict(prefetch=1), dict(prefetch=3)):
        got = [step_digest(s) for s in BalancedStepLoader([index], C, STEP, num_workers=2, epochs=2, seed=4, **kw)]
        assert got == ref, kw


def test_close_stops_a_worker_waiting_for_a_slot(shard_set):
    loader = BalancedStepLoader([shard_set[0]], C, STEP, num_workers=2, prefetch=1)
    it = iter(loader)
    next(it)
    procs = [c._proc for c in loader._clients]
    time.sleep(0.5)  # both workers have filled their slot and wait for it to be freed
    t0 = time.monotonic()
    it.close()
    assert all(p.poll() is not None for p in procs)
    assert time.monotonic() - t0 < 5


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return "\nState:\tZ" not in f.read()  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("shared_memory", [True, False])
def test_workers_exit_when_their_consumer_is_killed(shard_set, shared_memory):
    """SIGKILL of the training process (preemption, OOM killer): its workers, blocked on a full
    pipe or waiting for a slot that will never be freed, must not live on as orphans."""
    code = (f"import sys, time; sys.path.insert(0, {os.path.dirname(__file__)!r})\n"
            "from data_pipeline import BalancedStepLoader\n"
            f"loader = BalancedStepLoader([{shard_set[0]!r}], {C}, {STEP}, num_workers=2, prefetch=1, "
            f"shared_memory={shared_memory})\n"
            "it = iter(loader); next(it)\n"
            "print(' '.join(str(c._proc.pid) for c in loader._clients), flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    pids = []
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
        for p in pids:  # fresh interpreters (fork + exec), not forks of the consumer: see reader.py
            assert b"hnet-data-worker" in open(f"/proc/{p}/cmdline", "rb").read()
        time.sleep(0.5)  # the workers fill their slot / pipe and block
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in pids), "data workers outlived their killed consumer"
    finally:
        proc.kill()
        for p in pids:  # a failed run leaves no orphans behind
            try:
                os.kill(p, 9)
            except OSError:
                pass


def test_worker_signals(shard_set):
    """SLURM's SIGTERM and SIGUSR1 and a Ctrl-C reach every process of the step: the trainer
    answers them with a checkpoint, so its workers must go on reading
    until it stops them."""
    import signal

    flags = []
    old = {s: signal.signal(s, lambda *a: flags.append(a[0])) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        loader = BalancedStepLoader([shard_set[0]], C, STEP, num_workers=1, prefetch=1, seed=9)
        ref = [step_digest(s) for s in BalancedStepLoader([shard_set[0]], C, STEP, num_workers=0, seed=9, epochs=1)]
        it = iter(loader)
        got = [step_digest(next(it))]
        proc = loader._clients[0]._proc
        for sig in (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM):
            os.kill(proc.pid, sig)
        time.sleep(0.5)
        assert proc.poll() is None
        got += [step_digest(next(it)) for _ in range(len(ref) - 2)]
        assert got == ref[:-1]  # the last step of a 1-epoch run is packed as the last
        assert not flags  # the signals went to the worker only
        it.close()
        assert proc.poll() is not None
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def test_events_of_a_worker_that_already_ended(shard_set):
    """A stream with nothing to read sends its last events and ends at once; the consumer reads
    them afterwards (freeing their slots must not fail because the worker is gone)."""
    from data_pipeline.index import load_index
    from data_pipeline.reader import StreamClient

    _, shards = load_index(shard_set[0])
    args = dict(shards=shards, plan=[], position=[0, 0], epoch=0, seed=0, stream=0, n_streams=1,
                epochs=1, on_error="skip")
    for shared_memory in (True, False):
        client = StreamClient(args, True, prefetch=2, shared_memory=shared_memory)  # 2 slots, 2 batches: no wait
        client._proc.wait(30)  # ended, its pipe ends closed
        assert [client.next(), client.next()] == [("epoch_end", 0), ("end",)]
        client.close()
