"""Training metrics, named once: one step's `StepResult`, timings and evaluation results become
the metrics that go to MLflow, train_log.jsonl and the console.

The names are a public interface (runs are compared across versions of the code):
train/loss, train/bpb, train/ratio_loss, train/lr, train/grad_norm, train/bytes_seen,
train/compression/stage{s} (bytes per chunk after routing level s, cumulative),
train/boundary_fraction/stage{s}, perf/step_time_s, perf/bytes_per_s, perf/mfu (CUDA only),
data/packing_efficiency, data/imbalance, and eval/bpb, eval/compression/stage{s}.
"""
from __future__ import annotations

import json
import os

import torch

from parallel.distributed import all_gather_object

# Dense peak TFLOP/s per GPU, by precision. PCIe and NVL parts clock lower than SXM ones and are
# told apart by their device names (torch.cuda.get_device_name: "NVIDIA H100 PCIe",
# "NVIDIA H100 NVL", "NVIDIA H100 80GB HBM3"). fp32 is the plain fp32 rate: torch keeps TF32
# matmuls off by default. Vendor data sheets; `train.peak_tflops` overrides any of them.
PEAK_TFLOPS = [  # (substring of the name, bf16, fp32), the first match wins
    ("H200 NVL", 835.0, 60.0), ("H200", 989.0, 67.0),
    ("H100 NVL", 835.0, 60.0), ("H100 PCIe", 756.0, 51.0), ("H100", 989.0, 67.0),
    ("A100", 312.0, 19.5), ("L40S", 362.0, 91.6), ("A10", 125.0, 31.2),
]


def peak_tflops(device_name: str, precision: str, override: float = 0.0) -> tuple[float, str]:
    """(peak TFLOP/s of one device at `precision`, where the figure came from); 0 when unknown."""
    if override:
        return float(override), "train.peak_tflops"
    for key, bf16, fp32 in PEAK_TFLOPS:
        if key in device_name:
            return (bf16 if precision == "bf16" else fp32), f"table: {key} {precision}"
    return 0.0, f"unknown device {device_name!r}: set train.peak_tflops for perf/mfu"


class TrainMetrics:
    """Turns step results into named metrics; computes throughput and MFU."""

    def __init__(self, model_cfg, world_size: int, precision: str = "fp32", peak_override: float = 0.0):
        self.model_cfg = model_cfg
        self.n_stages = model_cfg.num_stages
        self.world_size = world_size
        self.peak, self.peak_source = 0.0, "no CUDA device: no perf/mfu"
        if torch.cuda.is_available():
            self.peak, self.peak_source = peak_tflops(torch.cuda.get_device_name(), precision, peak_override)

    def mfu(self, bytes_per_chunk: list[float], bytes_per_s: float) -> float:
        """Model FLOPs utilisation: the FLOP estimate at the measured per-level compression."""
        from pretrain.model import flops_per_byte, stage_compression

        fpb = flops_per_byte(self.model_cfg, stage_compression(bytes_per_chunk))
        return fpb * bytes_per_s / (self.peak * 1e12 * self.world_size)

    def step(self, res, batch, lr: float, step_time: float, bytes_seen: int) -> dict[str, float]:
        m = {"train/loss": res.loss, "train/bpb": res.bpb, "train/ratio_loss": res.ratio_loss, "train/lr": lr,
             "train/grad_norm": res.grad_norm, "train/bytes_seen": bytes_seen, "perf/step_time_s": step_time,
             "perf/bytes_per_s": batch.global_bytes / max(1e-9, step_time)}
        for s in range(self.n_stages):
            m[f"train/compression/stage{s}"] = res.compression[s]
            m[f"train/boundary_fraction/stage{s}"] = res.boundary_fraction[s]
        for k in ("data/packing_efficiency", "data/imbalance"):
            if k in batch.metrics:
                m[k] = float(batch.metrics[k])
        if self.peak:
            m["perf/mfu"] = self.mfu(res.compression, m["perf/bytes_per_s"])
        m.update(getattr(res, "extra_metrics", None) or {})
        return m

    @staticmethod
    def record(step: int, res, lr: float, batch, step_time: float) -> dict:
        """The step's line in train_log.jsonl."""
        return {"step": step, "loss": res.loss, "bpb": res.bpb, "ratio_loss": res.ratio_loss, "lr": lr,
                "grad_norm": res.grad_norm, "skipped": res.skipped, "compression": res.compression,
                "n_micro": res.n_micro, "bytes": int(batch.global_bytes), "step_time_s": step_time}

    @staticmethod
    def console(step: int, total: int, res, lr: float, bytes_per_s: float, eta_s: float) -> str:
        comp = " ".join(f"s{s}={c:.2f}" for s, c in enumerate(res.compression))
        return (f"step {step}/{total} loss {res.loss:.4f} bpb {res.bpb:.4f} ratio {res.ratio_loss:.4f} "
                f"bytes/chunk {comp} lr {lr:.2e} gnorm {res.grad_norm:.3f} {bytes_per_s:,.0f} B/s ETA {eta_s:,.0f} s")

    def eval_console(self, step: int, ev: dict) -> str:
        comp = " ".join(f"s{s}={ev[f'eval/compression/stage{s}']:.2f}" for s in range(self.n_stages))
        return f"eval step {step}: bpb {ev['eval/bpb']:.4f} bytes/chunk {comp}"


class StepReporter:
    """Hands metrics to the tracker (rank 0's; a no-op tracker elsewhere), to train_log.jsonl
    (rank 0) and, every train.log_every steps, to the console."""

    def __init__(self, metrics: TrainMetrics, tracker, run_dir: str, rank: int, total_steps: int, log_every: int,
                 log_keys: bool, start_step: int, clock, log=print):
        self.metrics, self.tracker, self.rank = metrics, tracker, rank
        self.total, self.log_every, self.log_keys, self.log = total_steps, log_every, log_keys, log
        self.file = open(os.path.join(run_dir, "train_log.jsonl"), "a") if rank == 0 else None
        self.clock = clock
        self._last_t, self._last_step = clock(), start_step

    def step(self, step: int, batch, res, lr: float, step_time: float, bytes_seen: int) -> None:
        metrics = self.metrics.step(res, batch, lr, step_time, bytes_seen)
        self.tracker.log(metrics, step)
        record = TrainMetrics.record(step, res, lr, batch, step_time)
        if "perf/mfu" in metrics:  # the run's figures readable without MLflow, too
            record["mfu"] = metrics["perf/mfu"]
        if self.log_keys:  # a collective: every rank takes part
            gathered = all_gather_object([k for mb in batch.micro_batches if mb is not None for k in mb.keys])
            record["keys"] = sorted(k for ks in gathered for k in ks)
        self._write(record)
        if self.rank == 0 and (step % self.log_every == 0 or step == self.total):
            now = self.clock()
            rate = (step - self._last_step) / max(1e-9, now - self._last_t)
            self.log(TrainMetrics.console(step, self.total, res, lr, metrics["perf/bytes_per_s"],
                                          (self.total - step) / max(1e-9, rate)))
            self._last_t, self._last_step = now, step

    def eval(self, step: int, ev: dict) -> None:
        self.tracker.log(ev, step)
        if self.rank == 0:
            self.log(self.metrics.eval_console(step, ev))
        self._write({"step": step, **ev})

    def _write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
