"""Helpers for the SLURM tests: the local cluster's availability, job submission and bounded waits."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO / "cluster" / "local_slurm.sh"
LAUNCH = REPO / "cluster" / "launch.sh"
SBATCH_SCRIPT = REPO / "cluster" / "slurm" / "train.sbatch"
TINY = "pretrain/configs/tiny.yaml"
JOBCOMP_LOG = Path("/var/log/slurm/jobcomp.log")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}


def why_no_local_slurm() -> str | None:
    """The reason the local single-node SLURM cannot be used here, or None."""
    if os.geteuid() != 0:
        return "the SLURM tests need root (cluster/local_slurm.sh installs packages and starts daemons)"
    if not Path("/etc/debian_version").exists():
        return "the SLURM tests need Debian (cluster/local_slurm.sh uses Debian's slurm-wlm and munge)"
    return None


def run_script(args: list[str], timeout: float) -> tuple[int, str]:
    """Runs a command with its output in a temporary file, not a pipe: the daemons it starts
    could inherit a pipe and keep `communicate()` waiting for an EOF that never comes."""
    with tempfile.TemporaryFile("w+") as out:
        try:
            rc = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = 124
        out.seek(0)
        return rc, out.read()


def job_env(**extra: str) -> dict[str, str]:
    """The environment a test job is submitted with (sbatch exports it to the job)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONHASHSEED"] = "0"
    env["HNET_REPO"] = str(REPO)
    env["HNET_PYTHON"] = sys.executable
    env.update(extra)
    return env


def sbatch(args: list[str], env: dict[str, str], cwd: Path = REPO) -> str:
    """Submits and returns the job id."""
    res = subprocess.run(["sbatch", "--parsable", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, f"sbatch {args} failed: {res.stderr}"
    return res.stdout.strip().split(";")[0]


def job_info(job_id: str) -> dict[str, str]:
    """`scontrol show job -o` as a dict (JobState, ExitCode, Restarts, StartTime, ...); {} once purged."""
    res = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        return {}
    info = {}
    for field in res.stdout.split():
        if "=" in field:
            k, v = field.split("=", 1)
            info.setdefault(k, v)
    return info


def wait_for_job(job_id: str, timeout: float, until=None, output: Path | None = None) -> dict[str, str]:
    """Polls until `until(info)` holds (default: a terminal state); scancels and fails on timeout."""
    until = until or (lambda i: i.get("JobState") in TERMINAL)
    deadline = time.time() + timeout
    info: dict[str, str] = {}
    while time.time() < deadline:
        info = job_info(job_id)
        if info and until(info):
            return info
        time.sleep(0.5)
    subprocess.run(["scancel", job_id], timeout=30)
    log = tail(output) if output else ""
    raise AssertionError(f"job {job_id} not done within {timeout:.0f} s (last state {info.get('JobState')}, "
                         f"restarts {info.get('Restarts')}); job output:\n{log}")


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def tail(path: Path | None, n: int = 6000) -> str:
    if path is None or not path.exists():
        return f"(no output file {path})"
    text = path.read_text(errors="replace")
    # DeepSpeed's deprecation warnings drown the interesting lines.
    lines = [ln for ln in text.splitlines() if "Warning" not in ln and "return func(" not in ln]
    return "\n".join(lines)[-n:]


def jobcomp_records(job_id: str, log: Path = JOBCOMP_LOG) -> list[dict[str, str]]:
    """Every end of the job (each requeue and the final end) recorded by jobcomp/filetxt, as its
    KEY=VALUE fields."""
    if not log.exists():
        return []
    out = []
    for line in log.read_text(errors="replace").splitlines():
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("JobId") == job_id:
            out.append(fields)
    return out


def jobcomp_states(job_id: str, log: Path = JOBCOMP_LOG) -> list[str]:
    return [r.get("JobState", "?") for r in jobcomp_records(job_id, log)]


def slurm_seconds(stamp: str) -> float:
    """'2026-11-28T01:24:32' (SLURM's local time) -> epoch seconds."""
    return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
