"""Convert a ZeRO checkpoint to DeepSpeed's universal format so it resumes at another data-parallel size.

    python -m pretrain.reshard CKPT_DIR_OR_RUN_DIR [--tag stepNNNNNNNN]

Writes `<tag>_universal/` beside the tag (via `deepspeed.checkpoint.ds_to_universal`). The trainer
notices that the checkpoint was written by another number of ranks and loads the universal copy
with `checkpoint.load_universal` for that one load; the data loader's saved state (identical on
every rank, all ranks' stream positions) is re-dealt over the new ranks without repeating or
skipping documents. The trainer also runs this conversion itself when checkpoint.auto_reshard is on.
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from parallel.distributed import barrier, broadcast_object
from pretrain.checkpoint import COMPLETE, LATEST, CheckpointManager, atomic_write
from pretrain.errors import TrainingError


def find_checkpoint_root(path: str) -> str:
    """A run directory, a checkpoints directory (with `latest`) or a tag directory -> the checkpoints root."""
    for cand in (path, os.path.join(path, "checkpoints")):
        if os.path.isfile(os.path.join(cand, LATEST)):
            return cand
    if os.path.isfile(os.path.join(path, COMPLETE)):
        return os.path.dirname(os.path.abspath(path))
    raise FileNotFoundError(f"{path}: no checkpoint found (expected a `{LATEST}` file or a complete tag directory)")


JOB_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def _ignore_job_signals() -> None:
    """In the child, before exec: ignore the job signals (ignored stays ignored across exec), then
    unblock them; one that arrived meanwhile was pending and is dropped by SIG_IGN."""
    for sig in JOB_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)


def run_ignoring_job_signals(cmd: list[str]) -> subprocess.CompletedProcess:
    """subprocess.run(cmd) whose child never dies of SIGUSR1 / SIGTERM. The signals are blocked
    in this thread while the child is forked, so none lands between fork and the child's
    SIG_IGN (a child forked with the default disposition would die of it); a signal meant for
    this process then waits until the child exists and is handled as usual."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_ignore_job_signals)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
    out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def pipeline_parts(tag_dir: str) -> list[str]:
    """The per-stage folders (pipe0, pipe1, ...) of a pipelined run's checkpoint; [""] otherwise:
    every part is an ordinary data-parallel ZeRO checkpoint of its own."""
    parts = sorted((d for d in os.listdir(tag_dir) if re.fullmatch(r"pipe\d+", d)
                    and os.path.isdir(os.path.join(tag_dir, d))), key=lambda d: int(d[4:]))
    return parts or [""]


def convert_to_universal(root: str, tag: str, workers: int = 1) -> str:
    """Converts root/tag into root/<tag>_universal (atomically: a temporary folder renamed at the
    end); a pipelined checkpoint stage by stage (<tag>_universal/pipe{k})."""
    src = os.path.join(root, tag)
    if not os.path.isfile(os.path.join(src, COMPLETE)):
        raise RuntimeError(f"{src} is not a complete checkpoint")
    final = os.path.join(root, f"{tag}_universal")
    if universal_ready(root, tag):
        return final
    # one temporary folder per converter: a second one (another job, a manual run) never
    # deletes or mixes into this one's files; the first to finish wins, the other's copy goes
    tmp = os.path.join(root, f".tmp_{tag}_universal.{socket.gethostname()}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for part in pipeline_parts(src):
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                   os.path.join(src, part), "--output_folder", os.path.join(tmp, part),
                   "--num_extract_workers", str(workers), "--num_merge_workers", str(workers)]
            # SLURM signals every process of the step (SIGUSR1 with --full, SIGTERM on preemption):
            # the trainer answers with a checkpoint after the conversion, so the converter must not die
            res = run_ignoring_job_signals(cmd)
            if res.returncode != 0:
                raise RuntimeError(f"ds_to_universal failed for {os.path.join(src, part)} (exit status "
                                   f"{res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        for name in ("meta.json", "config.yaml"):
            shutil.copy2(os.path.join(src, name), os.path.join(tmp, name))
        if not universal_ready(root, tag):  # else another converter finished first:
            shutil.rmtree(final, ignore_errors=True)  # ranks may be loading its copy already
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # a failed or superseded conversion leaves no copy behind
    # ds_to_universal points latest_universal at the temporary name; point it at the real one.
    atomic_write(os.path.join(root, "latest_universal"), os.path.basename(final))
    return final


def universal_ready(root: str, tag: str) -> bool:
    src, final = os.path.join(root, tag), os.path.join(root, f"{tag}_universal")
    parts = pipeline_parts(src) if os.path.isdir(src) else [""]
    return all(os.path.isdir(os.path.join(final, part, "zero")) for part in parts)


def convert_on_rank0(root: str, tag: str, rank: int, attempt: str, timeout_s: float, poll_s: float = 1.0) -> None:
    """Rank 0 converts root/tag; the other ranks wait for the result on the shared file system.

    Not in a collective: a large model's conversion can outlast the collective timeout, and the
    job would then fail, be requeued and start the conversion over, forever. A failure on rank 0
    is written to `.<tag>_universal.failed.<attempt>` (attempt: an id rank 0 broadcast for this
    start), so the waiting ranks stop with rank 0's error instead of waiting out `timeout_s`."""
    failed = os.path.join(root, f".{tag}_universal.failed.{attempt}")
    if rank == 0:
        for old in glob.glob(os.path.join(glob.escape(root), f".{glob.escape(tag)}_universal.failed.*")):
            os.remove(old)  # earlier attempts': their waiters are gone
        try:
            convert_to_universal(root, tag)
        except BaseException as e:
            atomic_write(failed, f"{type(e).__name__}: {e}")
            raise
        return
    deadline = time.monotonic() + timeout_s
    while not universal_ready(root, tag):
        if os.path.isfile(failed):
            with open(failed) as f:
                raise RuntimeError(f"rank 0 could not convert checkpoint {tag} to the universal format: {f.read()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"waited {timeout_s:.0f} s (checkpoint.reshard_timeout_s) for rank 0 to convert "
                               f"checkpoint {tag} to the universal format in {root}; convert it beforehand with "
                               f"`python -m pretrain.reshard {root}`, or raise the timeout")
        time.sleep(poll_s)


def tag_to_load(root: str, tag: str, saved_world: int, rank: int, world: int, auto_reshard: bool,
                timeout_s: float, log=print) -> tuple[str, bool]:
    """Which checkpoint to load to resume `tag` at `world` ranks: (tag, False) at the same size;
    else DeepSpeed's universal copy of it, (tag_universal, True), converted first by rank 0 if
    it does not exist yet (every rank calls this; they leave together)."""
    if saved_world == world:
        return tag, False
    from uuid import uuid4

    # rank 0 decides for all: ranks looking at the folder themselves could disagree (a manual
    # conversion finishing meanwhile, a stale NFS view) and run different collectives
    need, attempt = broadcast_object((not universal_ready(root, tag), uuid4().hex) if rank == 0 else None)
    if need:
        if not auto_reshard:
            raise TrainingError(f"checkpoint {tag} was written by {saved_world} ranks, this run has {world}: "
                                f"run `python -m pretrain.reshard {root}` first")
        log(f"converting checkpoint {tag} (written by {saved_world} ranks) to the universal format on rank 0")
        convert_on_rank0(root, tag, rank, attempt, timeout_s)
        barrier()
    return f"{tag}_universal", True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.reshard", description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="run directory, checkpoints directory or tag directory")
    ap.add_argument("--tag", default=None, help="checkpoint tag (default: the one `latest` names)")
    ap.add_argument("--workers", type=int, default=1)
    a = ap.parse_args(argv)
    try:
        root = find_checkpoint_root(a.path)
        tag = a.tag or CheckpointManager(root).latest_tag()
        if os.path.isfile(os.path.join(a.path, COMPLETE)) and a.tag is None:
            tag = os.path.basename(os.path.abspath(a.path))
        out = convert_to_universal(root, tag, a.workers)
    except (FileNotFoundError, RuntimeError) as e:  # no checkpoint there, an incomplete one, a failed conversion
        print(f"[reshard] error: {e}", file=sys.stderr)
        return 2
    print(f"universal checkpoint written to {out}; the next run in this run directory at any number of ranks "
          f"resumes from it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
