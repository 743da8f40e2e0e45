"""The test harness's forked ranks (trainer_harness.start_python) behave as `python` does: the
same argv, working directory, environment, session, output, and exit codes (SystemExit's code,
1 for an exception, -9 when SIGKILLed), next to a real interpreter started for the same line."""
from __future__ import annotations

import os
import signal
import time

import pytest

import trainer_harness
from trainer_harness import PY, base_env, start_python

PROBE = """
import os, sys, time
print("argv", sys.argv, "cwd", os.getcwd(), "own session", os.getsid(0) == os.getpid(),
      "probe", os.environ.get("HNET_PROBE"), "main", __name__, flush=True)
mode = sys.argv[1]
if mode == "exit3":
    sys.exit(3)
if mode == "raise":
    raise ValueError("boom")
if mode == "hang":
    time.sleep(120)
"""


def launch(tmp_path, mode: str, forked: bool):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    log_path = tmp_path / f"{mode}-{forked}.log"
    log = open(log_path, "w")
    env = base_env({"HNET_PROBE": "seen"})
    env.pop("HNET_TEST_NO_FORKSERVER", None)
    if not forked:
        env["HNET_TEST_NO_FORKSERVER"] = "1"
    proc = start_python([PY, str(script), mode], tmp_path, env, log)
    return proc, log, log_path


@pytest.mark.parametrize("mode", ["ok", "exit3", "raise", "hang"])
def test_a_forked_rank_behaves_as_a_python_process(tmp_path, mode):
    results = {}
    for forked in (True, False):
        proc, log, log_path = launch(tmp_path, mode, forked)
        assert isinstance(proc, trainer_harness.ForkedPython) == forked
        try:
            if mode == "hang":
                deadline = time.time() + 60
                while "own session" not in log_path.read_text() and time.time() < deadline:
                    time.sleep(0.1)
                os.killpg(proc.pid, signal.SIGKILL)  # the whole session, as Ranks.kill does
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
        text = log_path.read_text()
        results[forked] = (code, text.splitlines()[0], "ValueError: boom" in text)
    assert results[True] == results[False], results
    code, first, raised = results[True]
    assert code == {"ok": 0, "exit3": 3, "raise": 1, "hang": -9}[mode]
    assert "own session True" in first and "probe seen" in first and "main __main__" in first
    assert raised == (mode == "raise")


LEAVER = """
import sys
sys.path.insert(0, sys.argv[1])
import trainer_harness as h
h.PRELOAD[:] = []  # a server that starts fast: this checks the exit, not the preload
log = open(sys.argv[2] + "/hang.log", "w")
# a rank that answers SIGTERM later (as the trainer does, with a checkpoint): here, never
hang = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"
p = h.start_python([h.PY, "-c", hang], sys.argv[2], h.base_env(), log)
import time
while "ready" not in open(sys.argv[2] + "/hang.log").read():
    time.sleep(0.05)
print(p.pid, flush=True)
"""


def test_a_session_that_ends_kills_the_ranks_it_left_running(tmp_path):
    """A test that fails before it kills its ranks must not leave them running, nor hold the
    session's exit (multiprocessing alone would SIGTERM them and wait)."""
    import subprocess

    res = subprocess.run([PY, "-c", LEAVER, os.path.dirname(trainer_harness.__file__), str(tmp_path)],
                         env=base_env(), capture_output=True, text=True, timeout=40)
    assert res.returncode == 0, res.stderr
    pid = int(res.stdout.split()[0])
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{pid}"), f"forked rank {pid} outlived the session that started it"
