"""Where a run's time and memory went: timers over the loop and the end-of-run summary.json."""
from __future__ import annotations

import json
import os
import resource
import time

import torch

from parallel.distributed import all_gather_object


def reset_peak_rss() -> bool:
    """Resets the kernel's resident-set high-water mark (Linux: write 5 to /proc/self/clear_refs), so the
    peak read later covers training only, not the one-off full-model build before ZeRO partitions it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """VmHWM of this process in MiB (falls back to getrusage's lifetime peak)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class RunTimers:
    """Seconds spent getting data, in whole steps, in checkpoints and in evaluation."""

    def __init__(self):
        self.data_s = self.step_s = self.ckpt_s = self.eval_s = 0.0
        self.steps = 0
        self.start = time.perf_counter()
        self.peak_reset = reset_peak_rss()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def summary(self, status: str, step: int, start_step: int, world_size: int, run_id, tracker) -> dict:
        """The run's summary (a collective: every rank reports its memory peaks)."""
        total = time.perf_counter() - self.start
        lifetime_peak = all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MiB
        train_peak = all_gather_object(peak_rss_mib() if self.peak_reset else None)
        cuda_peak = all_gather_object(torch.cuda.max_memory_allocated() / 2 ** 20) if torch.cuda.is_available() else None
        n = max(1, self.steps)
        setup = getattr(tracker, "setup_seconds", 0.0)
        return {"status": status, "step": step, "steps_this_run": self.steps, "wall_s": total,
                "step_time_s": self.step_s / n, "data_share": self.data_s / max(1e-9, self.step_s),
                "tracking_s": tracker.seconds, "tracking_setup_s": setup,
                "tracking_share": (tracker.seconds - setup) / max(1e-9, self.step_s),
                "ckpt_s": self.ckpt_s, "ckpt_share": self.ckpt_s / max(1e-9, total),
                "eval_s": self.eval_s, "world_size": world_size, "mlflow_run_id": run_id,
                "tracking_uri": tracker.uri, "start_step": start_step, "peak_rss_mib_per_rank": lifetime_peak,
                "train_peak_rss_mib_per_rank": train_peak, "cuda_peak_mib_per_rank": cuda_peak}


def write_summary(run_dir: str, summary: dict) -> None:
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
