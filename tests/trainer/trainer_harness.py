"""Launching real training processes for the trainer tests: one subprocess per rank, gloo, timeouts."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TINY = str(REPO / "pretrain" / "configs" / "tiny.yaml")


def make_demo_shards(out: Path) -> dict[str, str]:
    """~450 KB of demo documents as WebDataset shards under `out`: train and val index paths."""
    subprocess.run([PY, "-m", "data_pipeline.shard", "--demo", str(out), "--demo-bytes", "300KB"], cwd=REPO,
                   env=base_env(), check=True, capture_output=True, timeout=120)
    return {"train": str(out / "train" / "index.json"), "val": str(out / "val" / "index.json")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env.setdefault("DS_ACCELERATOR", "cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONHASHSEED"] = "0"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID", "SLURM_PROCID",
              "SLURM_NTASKS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    env.update(extra or {})
    return env


# --- Rank processes forked from a preloaded interpreter -----------------------------------------
# Each rank of a test launch is a process of its own that runs the real entry point
# (`python -m pretrain.train ...`, or a worker script) over real gloo. What it does not repeat is
# importing torch, DeepSpeed, MLflow and torch's compiler stack (DeepSpeed's ZeRO start imports
# it): about 12 s of CPU per process here, two thirds of a tiny run's launch. multiprocessing's
# forkserver imports them once; a rank is forked from it, takes its environment, session, working
# directory and log, and runs the module or script as the interpreter would (same exit codes:
# SystemExit's code, 1 for an exception, -N for signal N). It is not used, and a real interpreter
# starts, when HNET_TEST_NO_FORKSERVER is set or when a launch differs from the server in what an
# interpreter fixes as it starts (hash seed, thread counts, accelerator, import path). The SLURM,
# torchrun and CLI tests always start real interpreters.
PRELOAD = ["numpy", "yaml", "torch", "torch._inductor.config", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer",
           "mlflow", "mlflow.entities", "mlflow.tracking", "mlflow.store.tracking.sqlalchemy_store", "webdataset"]
FIXED_AT_START = ("PYTHONHASHSEED", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "DS_ACCELERATOR", "PYTHONPATH",
                  "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE")
_server_env: dict | None = None


def _forkserver_for(argv: list[str], env: dict):
    """The forkserver context when this launch can be forked from it, else None."""
    global _server_env
    if env.get("HNET_TEST_NO_FORKSERVER") or argv[0] != PY or len(argv) < 2:
        return None
    import multiprocessing
    from multiprocessing import forkserver

    if _server_env is None:
        import atexit

        _server_env = base_env()
        forkserver.set_forkserver_preload(PRELOAD)
        atexit.register(_end_forked_ranks_and_server)  # runs before multiprocessing's own exit hook
    if any(env.get(k) != _server_env.get(k) for k in FIXED_AT_START):
        return None
    # The server interpreter starts with the ranks' environment; ensure_running starts it, or
    # starts it again if it died, and otherwise returns at once.
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(_server_env)
    try:
        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return multiprocessing.get_context("forkserver")


def _run_as_main(argv: list[str], env: dict, cwd: str, log_path: str) -> None:
    """In the forked rank: what `python ARGS` would do, from the arguments on."""
    import atexit
    import runpy

    os.setsid()
    os.environ.clear()
    os.environ.update(env)
    os.chdir(cwd)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        if argv[1] == "-m":
            sys.argv = [argv[2], *argv[3:]]
            sys.path.insert(0, cwd)
            runpy.run_module(argv[2], run_name="__main__", alter_sys=True)
        elif argv[1] == "-c":
            sys.argv = ["-c", *argv[3:]]
            sys.path.insert(0, "")
            exec(compile(argv[2], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
        else:
            sys.argv = argv[1:]
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[1])))
            runpy.run_path(argv[1], run_name="__main__")
    finally:
        atexit._run_exitfuncs()  # an interpreter runs them at exit; a multiprocessing child would not
        sys.stdout.flush()
        sys.stderr.flush()


_forked: list["ForkedPython"] = []


def _end_forked_ranks_and_server() -> None:
    """At the test session's end: SIGKILL the session of every forked rank a test left running
    (multiprocessing would SIGTERM them and wait without a bound, and a rank that answers SIGTERM
    with a checkpoint could hold the exit until its collective timeout), then stop the server and
    multiprocessing's resource tracker rather than leave them to notice the exit."""
    from multiprocessing import forkserver, resource_tracker

    left = [p for p in _forked if p.poll() is None]
    for p in left:
        for kill in (os.killpg, os.kill):
            try:
                kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
    deadline = time.time() + 10
    while any(p.poll() is None for p in left) and time.time() < deadline:
        time.sleep(0.05)
    if any(p.poll() is None for p in left):
        return  # the server stops once they are gone; waiting for it here could hang the exit
    for helper in (forkserver._forkserver, resource_tracker._resource_tracker):
        try:
            helper._stop()  # what CPython's own tests use to stop them
        except (AttributeError, OSError, ChildProcessError):
            pass


class ForkedPython:
    """A rank forked from the preloaded server, with the part of Popen's interface the tests use."""

    def __init__(self, ctx, argv: list[str], cwd, env: dict, log_path: str):
        self.args = argv
        self._proc = ctx.Process(target=_run_as_main, args=(argv, env, str(cwd), log_path), daemon=True)
        self._proc.start()
        self.pid = self._proc.pid
        _forked.append(self)
        # Popen(start_new_session=True) returns once the child leads its own session: a test may
        # kill the session at once. The forked child gets there a few milliseconds later.
        deadline = time.time() + 30
        while time.time() < deadline and self.poll() is None:
            try:
                if os.getpgid(self.pid) == self.pid:
                    break
            except ProcessLookupError:
                break
            time.sleep(0.002)

    def poll(self) -> int | None:
        return self._proc.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self._proc.exitcode


def start_python(argv: list[str], cwd, env: dict, log):
    """`argv` (a `python ...` command line) in a session of its own, output to `log` (a file)."""
    ctx = _forkserver_for(argv, env)
    if ctx is not None:
        return ForkedPython(ctx, argv, cwd, env, os.path.abspath(log.name))
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


class Ranks:
    """`world` processes running `argv`, each with its torch rendezvous variables."""

    def __init__(self, argv: list[str], world: int, cwd: str | Path, env: dict | None = None, log_dir: str | Path = "."):
        port = free_port()
        self.procs = []
        self.logs = []
        for r in range(world):
            e = base_env(env)
            e.update({"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1",
                      "MASTER_PORT": str(port)})
            log = open(Path(log_dir) / f"rank{r}.log", "w")
            self.logs.append(log)
            # New session per rank: the test can SIGKILL a rank with everything it started.
            self.procs.append(start_python(argv, cwd, e, log))
        self.log_dir = Path(log_dir)

    def wait(self, timeout: float) -> list[int]:
        deadline = time.time() + timeout
        codes = []
        try:
            for p in self.procs:
                codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"ranks did not finish within {timeout} s; logs:\n{self.output()}") from None
        finally:
            for log in self.logs:
                log.close()
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            p.wait(timeout=30)

    def output(self, tail: int = 4000) -> str:
        out = []
        for r in range(len(self.procs)):
            text = (self.log_dir / f"rank{r}.log").read_text(errors="replace")
            out.append(f"--- rank {r} ---\n{text[-tail:]}")
        return "\n".join(out)


def kill_when_hanging(ranks: "Ranks", step: int, timeout: float = 300) -> None:
    """Waits until rank 0 logs that it hangs after `step` (debug.hang_at_step: its checkpoint, if
    any, is written), then SIGKILLs every rank; fails if a rank ended before that."""
    log = ranks.log_dir / "rank0.log"
    deadline = time.time() + timeout
    while time.time() < deadline and f"hanging after step {step}" not in log.read_text(errors="replace"):
        if any(p.poll() is not None for p in ranks.procs):
            break
        time.sleep(0.3)
    alive = [p.poll() is None for p in ranks.procs]
    hung = f"hanging after step {step}" in log.read_text(errors="replace")
    ranks.kill()
    assert all(alive) and hung, f"the ranks did not reach the hang after step {step}:\n{ranks.output()}"


def run_ranks(argv: list[str], world: int, cwd, env: dict | None = None, log_dir=".", timeout: float = 240,
              expect_ok: bool = True) -> tuple[list[int], str]:
    ranks = Ranks(argv, world, cwd, env, log_dir)
    codes = ranks.wait(timeout)
    out = ranks.output()
    if expect_ok and any(codes):
        raise AssertionError(f"ranks exited with {codes}:\n{out}")
    return codes, out


def train_argv(*overrides: str, config: str = TINY) -> list[str]:
    return [PY, "-m", "pretrain.train", "--config", config, *overrides]


def read_log(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "train_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_losses(run_dir) -> dict[int, float]:
    """Step -> loss of the last record of each step (a resumed run appends)."""
    out = {}
    for rec in read_log(run_dir):
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out
