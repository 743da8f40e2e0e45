"""The run-directory lease (pretrain/lease.py) on real files, with real processes for the races."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time

import pytest

from pretrain.lease import LEASE_FILE, LeaseHeld, RunLease

OTHER_HOST = {"host": "node-17", "pid": 4242, "launch_id": "slurm:42.0", "slurm_job_id": "42",
              "slurm_restart_count": 0, "start_time": 0.0, "pid_start": ""}


def write_record(run_dir, holder: dict, heartbeat: float, token: str = "theirs") -> None:
    (run_dir / LEASE_FILE).write_text(json.dumps({"holder": holder, "token": token, "heartbeat": heartbeat}))


def env(**kw) -> dict:
    return {k: str(v) for k, v in kw.items()}


def test_second_holder_refused_with_the_holder_named_then_free_after_release(tmp_path):
    first = RunLease(str(tmp_path), settle_s=0.05, env=env(WORLD_SIZE=2, MASTER_ADDR="a", MASTER_PORT=1))
    assert first.acquire() == "no lease"
    second = RunLease(str(tmp_path), settle_s=0.05, env=env(WORLD_SIZE=2, MASTER_ADDR="a", MASTER_PORT=2))
    with pytest.raises(LeaseHeld, match=f"pid {os.getpid()} on {socket.gethostname()}"):
        second.acquire()
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    assert second.acquire() == "no lease"
    second.release()


def test_heartbeat_refreshes_and_a_lost_lease_is_noticed(tmp_path):
    lease = RunLease(str(tmp_path), stale_after_s=5, heartbeat_s=0.1, settle_s=0.05)
    lease.acquire()
    first = json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / LEASE_FILE).read_text())["heartbeat"] > first
    write_record(tmp_path, OTHER_HOST, time.time())  # another launch took it over
    assert lease.lost.wait(2.0), "the holder did not notice that its lease was taken"
    lease.release()
    assert (tmp_path / LEASE_FILE).exists(), "release must not remove a lease that is not ours"


def test_stale_lease_of_another_host_taken_over_live_one_refused(tmp_path):
    write_record(tmp_path, OTHER_HOST, time.time() - 10)
    with pytest.raises(LeaseHeld, match="node-17.*SLURM job 42"):
        RunLease(str(tmp_path), stale_after_s=60, settle_s=0.05).acquire()
    how = RunLease(str(tmp_path), stale_after_s=5, settle_s=0.05).acquire()
    assert how.startswith("taken over from a stale lease") and "node-17" in how


def test_holder_process_gone_on_this_host_is_taken_over_at_once(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    write_record(tmp_path, {**OTHER_HOST, "host": socket.gethostname(), "pid": child.pid, "launch_id": "x",
                            "slurm_job_id": ""}, time.time())
    how = RunLease(str(tmp_path), stale_after_s=600, settle_s=0.05).acquire()
    assert "holder has ended" in how


def test_requeued_slurm_job_takes_its_lease_back_another_job_waits(tmp_path):
    write_record(tmp_path, OTHER_HOST, time.time())  # job 42, restart 0, heartbeat now, on another node
    with pytest.raises(LeaseHeld, match="in use by another launch"):
        RunLease(str(tmp_path), settle_s=0.05, env=env(SLURM_JOB_ID=43, SLURM_RESTART_COUNT=0)).acquire()
    how = RunLease(str(tmp_path), settle_s=0.05, env=env(SLURM_JOB_ID=42, SLURM_RESTART_COUNT=1)).acquire()
    assert how.startswith("taken back by requeued SLURM job 42")


def test_other_ranks_wait_for_their_launch_and_refuse_a_live_other(tmp_path):
    launch = env(WORLD_SIZE=2, MASTER_ADDR="h", MASTER_PORT=7)
    write_record(tmp_path, OTHER_HOST, time.time())
    with pytest.raises(LeaseHeld, match="node-17"):
        RunLease(str(tmp_path), env=launch).wait_for_own_launch(timeout_s=5)
    (tmp_path / LEASE_FILE).unlink()
    t0 = time.time()
    ctx = mp.get_context("spawn")
    p = ctx.Process(target=_acquire_after, args=(str(tmp_path), launch, 0.5))
    p.start()
    RunLease(str(tmp_path), env=launch).wait_for_own_launch(timeout_s=20)
    assert time.time() - t0 >= 0.4
    p.join(10)
    assert p.exitcode == 0


def _acquire_after(run_dir: str, launch: dict, delay: float) -> None:
    time.sleep(delay)
    RunLease(run_dir, settle_s=0.05, env=launch).acquire()


def _race(run_dir: str, port: int, start: float, results) -> None:
    while time.time() < start:
        time.sleep(0.001)
    try:
        RunLease(run_dir, settle_s=0.3, env=env(WORLD_SIZE=2, MASTER_ADDR="r", MASTER_PORT=port)).acquire()
        results.put(("won", port))
        time.sleep(1.0)  # hold it while the others decide
    except LeaseHeld as e:
        results.put(("refused", str(e)))


@pytest.mark.parametrize("stale", [False, True])
def test_simultaneous_starts_exactly_one_wins(tmp_path, stale):
    if stale:  # several launches find the same stale lease at once and all try to take it over
        write_record(tmp_path, OTHER_HOST, time.time() - 3600)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    start = time.time() + 2.0
    procs = [ctx.Process(target=_race, args=(str(tmp_path), port, start, results)) for port in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(10)
    assert sum(o[0] == "won" for o in outcomes) == 1, outcomes


def test_a_new_lease_is_never_seen_half_written(tmp_path, monkeypatch):
    """Rank 0 creating the lease while another rank of its launch reads it: the reader must find
    no lease or the whole record, never an empty file. An empty one reads as a foreign, fresh
    lease, and that rank refused its own launch (a requeued 2-rank SLURM job failed so: "in use
    by another launch: pid -1 on ?"). Every write the lease makes is checked, at its start, for
    what a reader would see at the lease's path at that moment."""
    from pretrain import lease as lease_module

    path = tmp_path / LEASE_FILE
    seen = []

    def look():
        rec = lease_module.LeaseRecord.read(str(path))
        seen.append(None if rec is None else rec.holder.host)

    class Watched:
        def __init__(self, f):
            self.f = f

        def write(self, s):
            look()
            return self.f.write(s)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

    real_open, real_fdopen = open, os.fdopen
    monkeypatch.setattr(lease_module, "open", lambda *a, **k: Watched(real_open(*a, **k)), raising=False)
    monkeypatch.setattr(os, "fdopen", lambda *a, **k: Watched(real_fdopen(*a, **k)))
    first = RunLease(str(tmp_path), settle_s=0.0, env=env(WORLD_SIZE=2, MASTER_ADDR="a", MASTER_PORT=1))
    assert first.acquire() == "no lease"
    first.release()
    assert seen and "?" not in seen, seen  # "?": the unreadable record an empty file gives
    assert not [p for p in os.listdir(tmp_path) if p != LEASE_FILE], "no temporary file left behind"
