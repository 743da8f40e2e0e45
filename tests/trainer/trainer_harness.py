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
            self.procs.append(subprocess.Popen(argv, cwd=cwd, env=e, stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True))
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
