"""The training entry point and loop.

    python -m pretrain.train --config pretrain/configs/X.yaml [dotted.key=value ...]

Launched by torchrun, by the deepspeed launcher, by srun (SLURM variables are mapped in
parallel/distributed.py), or as one plain process. The loop reads top to bottom: next step
batch -> learning rate -> executor.train_step (how forward/backward run over the engines lives
in parallel/step.py) -> metrics -> evaluation -> checkpoint -> signals.

`train(cfg)` returns a status: "completed", "preempted" (a signal asked for a checkpoint and a
requeue; `main` then runs `scontrol requeue` under SLURM when checkpoint.requeue is set) or
"stopped" (a STOP file in the run directory: stop for good, no requeue).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import torch

from parallel.distributed import (DistInfo, all_gather_object, all_reduce_max, all_reduce_sum, barrier,
                                  broadcast_object, init_process_group, setup_env)
from pretrain.checkpoint import CheckpointManager
from pretrain.config import ConfigError, ExperimentConfig, dump_yaml, load_config
from pretrain.model.config import ConfigError as ModelConfigError
from pretrain.reshard import convert_on_rank0, universal_ready
from pretrain.schedule import build_schedule
from pretrain.tracking import NullTracker, git_commit, make_tracker, package_versions

STATUS_COMPLETED, STATUS_PREEMPTED, STATUS_STOPPED = "completed", "preempted", "stopped"
STOP_FILE = "STOP"

# Dense bf16 peak per device for perf/mfu, by substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


class TrainingError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


# ----------------------------------------------------------------------------- small helpers
def log0(info: DistInfo, msg: str) -> None:
    if info.rank == 0:
        print(f"[train] {msg}", flush=True)


class SignalFlag:
    """SIGUSR1 / SIGTERM only set a flag; the loop acts on it at the next step boundary."""

    def __init__(self):
        self.raised = 0

    def install(self) -> None:
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handler)
            # Restart interrupted system calls: a signal landing in a communication thread's
            # blocking read must not surface as a failed collective.
            signal.siginterrupt(sig, False)

    def _handler(self, signum, frame) -> None:
        self.raised = signum


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def model_shape(model_dict: dict) -> dict:
    """The part of the model config that decides parameter shapes (ratio targets / alpha may change)."""
    return {k: v for k, v in model_dict.items() if k not in ("ratio_targets", "ratio_alpha")}


def describe_difference(a: dict, b: dict, prefix: str = "model.") -> str:
    diffs = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            diffs.append(f"{prefix}{k}: checkpoint {a.get(k)!r} vs requested {b.get(k)!r}")
    return "; ".join(diffs)


# ----------------------------------------------------------------------------- data
def make_cost_model(cfg: ExperimentConfig, model_cfg):
    from data_pipeline import DocCostModel

    if not cfg.data.cost_balance:
        return None
    return DocCostModel.from_model_config(model_cfg)


def update_cost_model(loader, model_cfg, bytes_per_chunk: list[float]) -> None:
    """Feeds the measured compression back into the balancer's cost model. Called at fixed steps,
    and the cost model is part of the loader state, so resumed runs balance exactly the same."""
    from pretrain.model import document_cost_terms

    cost = getattr(loader, "cost_model", None)
    if cost is None or not cost.attention_terms or any(not math.isfinite(c) or c <= 0 for c in bytes_per_chunk):
        return
    ratios, prev = [], 1.0
    for c in bytes_per_chunk:  # bytes per chunk at stage s -> compression of stage s alone
        ratios.append(max(1.0, c / prev))
        prev = c
    _, terms = document_cost_terms(model_cfg, ratios)
    cost.update_ratios([t[1] for t in terms])


def make_loader(cfg: ExperimentConfig, info: DistInfo, model_cfg, eval_split: bool = False):
    from data_pipeline import BalancedStepLoader

    d = cfg.data
    return BalancedStepLoader(
        index_paths=list(d.eval_index if eval_split else d.train_index),
        micro_batch_bytes=d.micro_batch_bytes,
        step_bytes=(d.eval_step_bytes or d.step_bytes) if eval_split else d.step_bytes,
        dp_rank=info.rank, dp_world=info.world_size,
        num_workers=0 if eval_split else d.num_workers,
        seed=d.seed, cost_model=make_cost_model(cfg, model_cfg),
        on_error=d.on_error, round_to=d.round_to, epochs=1 if eval_split else None)


# ----------------------------------------------------------------------------- evaluation
def evaluate(executor, cfg: ExperimentConfig, info: DistInfo, model_cfg) -> dict[str, float]:
    """Bits per byte (token-weighted over all ranks) and bytes per chunk per stage on the held-out shards."""
    n_stages = model_cfg.num_stages
    loss_sum = n_targets = n_bytes = 0.0
    bpc = [0.0] * n_stages
    from parallel.step import stage_stats

    loader = make_loader(cfg, info, model_cfg, eval_split=True)
    executor.module.eval()
    for i, batch in enumerate(loader):
        if cfg.train.eval_max_steps and i >= cfg.train.eval_max_steps:
            break  # every rank breaks at the same step: the loader gives all ranks equal step counts
        for mb in batch.micro_batches:
            out = executor.eval_forward(mb)
            loss_sum += float(out.loss_sum)
            n_targets += int(mb.n_targets)
            n_bytes += int(mb.n_bytes)
            stats, _ = stage_stats(out)
            for s in range(n_stages):
                bpc[s] += stats[s] * mb.n_bytes
    executor.module.train()
    tot = all_reduce_sum([loss_sum, n_targets, n_bytes] + bpc)
    metrics = {"eval/bpb": tot[0] / max(1.0, tot[1]) / math.log(2)}
    for s in range(n_stages):
        metrics[f"eval/compression/stage{s}"] = tot[3 + s] / max(1.0, tot[2])
    return metrics


# ----------------------------------------------------------------------------- building
def build_executor(cfg: ExperimentConfig, info: DistInfo, model_cfg, ds_config: dict | None):
    """The model on its device, wrapped by the executor that runs one step over the engine(s)."""
    from parallel.step import PlainStep, ZeroStep
    from pretrain.model import HNetForCausalLM, lr_multipliers

    # modulo: with --gpus-per-task=1 every task sees a single device 0
    device = (torch.device(f"cuda:{info.local_rank % torch.cuda.device_count()}") if torch.cuda.is_available()
              else torch.device("cpu"))
    seed_everything(cfg.train.seed)  # identical initial weights on every rank
    model = HNetForCausalLM(model_cfg)
    if cfg.train.activation_checkpointing:
        model.set_activation_checkpointing(True)
    mults = list(cfg.schedule.lr_multipliers or lr_multipliers(model_cfg))
    if len(mults) != model_cfg.num_stages + 1:
        raise ConfigError(f"schedule.lr_multipliers: expected {model_cfg.num_stages + 1} values (one per hierarchy "
                          f"level, outer first), got {mults}")
    if ds_config is None:
        from parallel.engine import build_optimizer

        model.to(device)
        opt, group_mults = build_optimizer(model, cfg, mults)
        return PlainStep(model, opt, model_cfg.num_stages, cfg.optim.grad_clip, device), group_mults, mults
    from parallel.engine import build_engine

    engine, group_mults = build_engine(model, cfg, ds_config, mults)
    return ZeroStep(engine, model_cfg.num_stages, info.rank, info.world_size), group_mults, mults


# ----------------------------------------------------------------------------- the run
def train(cfg: ExperimentConfig) -> str:
    """Runs (or resumes) the experiment; returns "completed", "preempted" or "stopped"."""
    info = setup_env()
    # Installed first: a preemption signal during start-up must not kill the process.
    flag = SignalFlag()
    flag.install()
    use_ds = cfg.train.engine == "deepspeed"
    if not use_ds and info.world_size > 1:
        raise ConfigError("train.engine=plain runs in one process; use train.engine=deepspeed with several ranks")

    # Everything that can be refused is checked before any process group or engine exists.
    from parallel.engine import resolve_ds_config
    from pretrain.model import HNetConfig

    ds_config = resolve_ds_config(cfg, info.world_size) if use_ds else None
    model_dict = cfg.model_dict()
    model_cfg = HNetConfig.from_dict(model_dict)
    ckpts = CheckpointManager(cfg.checkpoint_dir(), cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, info.rank)
    resume_tag = ckpts.latest_tag()
    meta = None
    if resume_tag:
        meta = ckpts.read_meta(resume_tag)
        want, have = model_shape(model_cfg.to_dict()), model_shape(meta["model"])
        if want != have:
            raise TrainingError(
                f"refusing to resume: checkpoint {ckpts.root}/{resume_tag} was trained with another model "
                f"({describe_difference(have, want)}). Use another run_dir or the checkpoint's model config.")
        if meta.get("engine", "deepspeed") != cfg.train.engine:
            raise TrainingError(f"refusing to resume: checkpoint {resume_tag} was written by train.engine="
                                f"{meta.get('engine')!r}, this run uses {cfg.train.engine!r}")

    init_process_group(info, use_deepspeed=use_ds, timeout_s=cfg.train.collective_timeout_s)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    os.makedirs(cfg.run_dir, exist_ok=True)
    config_yaml = dump_yaml(cfg)
    if info.rank == 0:
        print("[train] resolved config:\n" + config_yaml, flush=True)
        with open(os.path.join(cfg.run_dir, "config.yaml"), "w") as f:
            f.write(config_yaml)
        if ds_config is not None:
            with open(os.path.join(cfg.run_dir, "ds_config.json"), "w") as f:
                json.dump(ds_config, f, indent=1)

    executor, group_mults, level_mults = build_executor(cfg, info, model_cfg, ds_config)
    loader = make_loader(cfg, info, model_cfg)
    schedule = build_schedule(cfg, cfg.train.steps)

    step, bytes_seen, run_id = 0, 0, None
    bad_run = 0  # consecutive non-finite steps; saved, so a requeue cannot reset the max_bad_steps guard
    if resume_tag:
        universal = False
        load_tag = resume_tag
        if meta["world_size"] != info.world_size and use_ds:
            # A ZeRO checkpoint holds one shard per rank of the old data-parallel size: convert it to
            # DeepSpeed's universal format and load that, for this one load only.
            from uuid import uuid4

            # rank 0 decides for all: ranks looking at the folder themselves could disagree (a
            # manual conversion finishing meanwhile, a stale NFS view) and run different collectives
            need, attempt = broadcast_object(
                (not universal_ready(ckpts.root, resume_tag), uuid4().hex) if info.rank == 0 else None)
            if need:
                if not cfg.checkpoint.auto_reshard:
                    raise TrainingError(
                        f"checkpoint {resume_tag} was written by {meta['world_size']} ranks, this run has "
                        f"{info.world_size}: run `python -m pretrain.reshard {ckpts.root}` first")
                log0(info, f"converting checkpoint {resume_tag} (written by {meta['world_size']} ranks) to the "
                           f"universal format on rank 0")
                convert_on_rank0(ckpts.root, resume_tag, info.rank, attempt, cfg.checkpoint.reshard_timeout_s)
                barrier()
            universal, load_tag = True, f"{resume_tag}_universal"
        client = executor.load(ckpts.root, load_tag, universal=universal)
        step, bytes_seen, run_id = int(client["step"]), int(client["bytes_seen"]), client.get("mlflow_run_id")
        bad_run = int(client.get("bad_steps_in_a_row", 0))
        loader.load_state_dict(client["data_state"])
        schedule.load_state_dict(client["schedule"])
        rngs = client["rng"]
        if info.rank in rngs and meta["world_size"] == info.world_size:
            set_rng_state(rngs[info.rank])
        else:
            seed_everything(cfg.train.seed + 1000003 * step + info.rank)
        log0(info, f"resuming from checkpoint {ckpts.root}/{load_tag} at step {step} "
                   f"({bytes_seen:,} bytes seen; written by {meta['world_size']} ranks, now {info.world_size})")
    tracker = make_tracker(cfg, info.rank, run_id, step if resume_tag else None) if info.rank == 0 else NullTracker()
    if tracker.run_id:
        params = {"config": cfg.to_dict(), "world_size": info.world_size, "git_commit": git_commit(),
                  "versions": package_versions(), "ds": ds_config or {"engine": "plain"},
                  "model_resolved": model_cfg.to_dict(), "lr_multipliers": level_mults}
        tracker.log_params(params)
        tracker.log_artifact_text("config.yaml", config_yaml)
        if ds_config is not None:
            tracker.log_artifact_text("ds_config.json", json.dumps(ds_config, indent=1))
        log0(info, f"MLflow run {tracker.run_id} in {tracker.uri}")
    run_id = broadcast_object(tracker.run_id)  # the same client state on every rank

    if step >= cfg.train.steps:
        log0(info, f"nothing to do: checkpoint step {step} >= train.steps {cfg.train.steps}")
        tracker.finish()
        return STATUS_COMPLETED

    timers = {"data_s": 0.0, "step_s": 0.0, "ckpt_s": 0.0, "eval_s": 0.0, "steps": 0}
    log_path = os.path.join(cfg.run_dir, "train_log.jsonl")
    log_file = open(log_path, "a") if info.rank == 0 else None
    status = STATUS_COMPLETED
    t_start = time.perf_counter()
    start_step = step

    def save_checkpoint(at_step: int) -> None:
        t0 = time.perf_counter()
        tracker.flush()
        rngs = all_gather_object(rng_state())
        client = {"step": at_step, "bytes_seen": bytes_seen, "bad_steps_in_a_row": bad_run,
                  "data_state": loader.state_dict(),
                  "rng": {r: s for r, s in enumerate(rngs)}, "schedule": schedule.state_dict(),
                  "mlflow_run_id": run_id, "config": cfg.to_dict(), "config_hash": cfg.hash(),
                  "world_size": info.world_size}
        meta_out = {"step": at_step, "bytes_seen": bytes_seen, "world_size": info.world_size,
                    "engine": cfg.train.engine, "model": model_cfg.to_dict(), "config_hash": cfg.hash(),
                    "mlflow_run_id": run_id, "time": time.time()}

        def crash_hook(phase: str) -> None:
            d = cfg.debug
            if d.crash_in_save_at_step == at_step and info.rank == d.crash_rank and phase == "after_engine_save":
                print(f"[train] debug: rank {info.rank} dies in the middle of saving step {at_step}", flush=True)
                os._exit(17)

        tag = ckpts.save(executor, at_step, client, meta_out, config_yaml, crash_hook=crash_hook)
        timers["ckpt_s"] += time.perf_counter() - t0
        log0(info, f"checkpoint {ckpts.root}/{tag} written in {time.perf_counter() - t0:.1f} s")

    peak_reset = reset_peak_rss()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        it = iter(loader)
        last_log_t, last_log_step = time.perf_counter(), step
        while step < cfg.train.steps:
            step += 1
            if cfg.debug.raise_at_step == step and info.rank == cfg.debug.crash_rank:
                raise RuntimeError(f"debug.raise_at_step: rank {info.rank} fails at step {step}")
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            lr = schedule.apply(executor.param_groups, step, group_mults)
            res = executor.train_step(batch, inject_nan=step in cfg.debug.nan_at_steps)
            t2 = time.perf_counter()
            timers["data_s"] += t1 - t0
            timers["step_s"] += t2 - t0
            timers["steps"] += 1
            bytes_seen += int(batch.global_bytes)

            step_time = t2 - t0
            metrics = {"train/loss": res.loss, "train/bpb": res.bpb, "train/ratio_loss": res.ratio_loss,
                       "train/lr": lr, "train/grad_norm": res.grad_norm, "train/bytes_seen": bytes_seen,
                       "perf/step_time_s": step_time, "perf/bytes_per_s": batch.global_bytes / max(1e-9, step_time)}
            for s in range(model_cfg.num_stages):
                metrics[f"train/compression/stage{s}"] = res.compression[s]
                metrics[f"train/boundary_fraction/stage{s}"] = res.boundary_fraction[s]
            for k in ("data/packing_efficiency", "data/imbalance"):
                if k in batch.metrics:
                    metrics[k] = float(batch.metrics[k])
            if torch.cuda.is_available():
                from pretrain.model import flops_per_byte

                peak = cfg.train.peak_tflops or next((v for k, v in PEAK_TFLOPS.items()
                                                      if k in torch.cuda.get_device_name()), 0.0)
                if peak:
                    fpb = flops_per_byte(model_cfg, [max(1.0, c) for c in res.compression])
                    metrics["perf/mfu"] = fpb * metrics["perf/bytes_per_s"] / (peak * 1e12 * info.world_size)
            tracker.log(metrics, step)
            if log_file is not None:
                rec = {"step": step, "loss": res.loss, "bpb": res.bpb, "ratio_loss": res.ratio_loss, "lr": lr,
                       "grad_norm": res.grad_norm, "skipped": res.skipped, "compression": res.compression,
                       "n_micro": res.n_micro, "bytes": int(batch.global_bytes), "step_time_s": step_time}
                if cfg.debug.log_keys:
                    rec["keys"] = sorted(k for ks in all_gather_object([k for mb in batch.micro_batches for k in mb.keys])
                                         for k in ks)
                log_file.write(json.dumps(rec) + "\n")
                log_file.flush()
            elif cfg.debug.log_keys:
                all_gather_object([k for mb in batch.micro_batches for k in mb.keys])

            if res.skipped:
                bad_run += 1
                keys = [k for ks in all_gather_object(res.bad_keys) for k in ks]
                log0(info, f"step {step}: non-finite loss or gradient (loss {res.loss:.4g}, grad norm {res.grad_norm:.4g}); "
                           f"update skipped ({bad_run} in a row); micro-batch keys: {keys[:8]}")
                if bad_run >= cfg.train.max_bad_steps:
                    raise TrainingError(
                        f"stopping at step {step}: {bad_run} consecutive steps with a non-finite loss or gradient "
                        f"(train.max_bad_steps={cfg.train.max_bad_steps}); last bad micro-batches: {keys[:16]}")
            else:
                bad_run = 0

            if cfg.data.cost_balance and step % cfg.train.log_every == 0 and not res.skipped:
                update_cost_model(loader, model_cfg, res.compression)
            if info.rank == 0 and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                now = time.perf_counter()
                rate = (step - last_log_step) / max(1e-9, now - last_log_t)
                eta = (cfg.train.steps - step) / max(1e-9, rate)
                comp = " ".join(f"s{s}={c:.2f}" for s, c in enumerate(res.compression))
                print(f"[train] step {step}/{cfg.train.steps} loss {res.loss:.4f} bpb {res.bpb:.4f} "
                      f"ratio {res.ratio_loss:.4f} bytes/chunk {comp} lr {lr:.2e} gnorm {res.grad_norm:.3f} "
                      f"{metrics['perf/bytes_per_s']:,.0f} B/s ETA {eta:,.0f} s", flush=True)
                last_log_t, last_log_step = now, step

            if cfg.data.eval_index and ((cfg.train.eval_every and step % cfg.train.eval_every == 0)
                                        or step == cfg.train.steps):
                te = time.perf_counter()
                ev = evaluate(executor, cfg, info, model_cfg)
                timers["eval_s"] += time.perf_counter() - te
                tracker.log(ev, step)
                comp = " ".join(f"s{s}={ev[f'eval/compression/stage{s}']:.2f}" for s in range(model_cfg.num_stages))
                log0(info, f"eval step {step}: bpb {ev['eval/bpb']:.4f} bytes/chunk {comp}")
                if log_file is not None:
                    log_file.write(json.dumps({"step": step, **ev}) + "\n")
                    log_file.flush()

            # All ranks agree on signals and the STOP file, so they save and leave at the same step.
            stop_file = os.path.exists(os.path.join(cfg.run_dir, STOP_FILE))
            signalled, stopped = all_reduce_max([float(flag.raised != 0), float(stop_file)])
            every = cfg.checkpoint.every
            if (every and step % every == 0) or step == cfg.train.steps or signalled or stopped:
                save_checkpoint(step)
            if cfg.debug.hang_at_step == step:
                tracker.flush()
                log0(info, f"debug: hanging after step {step} (waiting to be killed)")
                while True:
                    time.sleep(1)
            if stopped:
                log0(info, f"STOP file found in {cfg.run_dir}: stopping for good at step {step}")
                status = STATUS_STOPPED
                break
            if signalled:
                log0(info, f"signal received: checkpoint at step {step} written, leaving for a requeue")
                status = STATUS_PREEMPTED
                break
    except BaseException:
        # Whatever stops the loop (an error, Ctrl-C), the buffered metrics reach the store.
        tracker.finish("FAILED")
        raise

    total = time.perf_counter() - t_start
    tracker.flush()
    import resource

    lifetime_peak = all_gather_object(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # MiB
    train_peak = all_gather_object(peak_rss_mib() if peak_reset else None)
    cuda_peak = all_gather_object(torch.cuda.max_memory_allocated() / 2 ** 20) if torch.cuda.is_available() else None
    n = max(1, timers["steps"])
    summary = {"status": status, "step": step, "steps_this_run": timers["steps"], "wall_s": total,
               "step_time_s": timers["step_s"] / n, "data_share": timers["data_s"] / max(1e-9, timers["step_s"]),
               "tracking_s": tracker.seconds, "tracking_setup_s": getattr(tracker, "setup_seconds", 0.0),
               "tracking_share": (tracker.seconds - getattr(tracker, "setup_seconds", 0.0)) / max(1e-9, timers["step_s"]),
               "ckpt_s": timers["ckpt_s"], "ckpt_share": timers["ckpt_s"] / max(1e-9, total),
               "eval_s": timers["eval_s"], "world_size": info.world_size, "mlflow_run_id": run_id,
               "tracking_uri": tracker.uri, "start_step": start_step, "peak_rss_mib_per_rank": lifetime_peak,
               "train_peak_rss_mib_per_rank": train_peak, "cuda_peak_mib_per_rank": cuda_peak}
    tracker.finish("FINISHED" if status == STATUS_COMPLETED else "KILLED")
    if info.rank == 0:
        with open(os.path.join(cfg.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)
        log0(info, f"{status} at step {step}: {summary['step_time_s']:.3f} s/step, data {summary['data_share']:.1%}, "
                   f"tracking {summary['tracking_share']:.2%}, checkpoints {summary['ckpt_share']:.1%} of wall time")
        log_file.close()
    barrier()
    return status


def requeue_if_slurm(cfg: ExperimentConfig, rank: int) -> bool:
    """Under SLURM, asks for the job to be requeued (rank 0 only). Returns True if requeued."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job or not cfg.checkpoint.requeue or rank != 0:
        return False
    res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    print(f"[train] scontrol requeue {job}: rc={res.returncode} {res.stderr.strip()}", flush=True)
    return res.returncode == 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="experiment YAML (pretrain/configs/*.yaml)")
    ap.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.steps=100")
    # The deepspeed launcher appends --local_rank=N (LOCAL_RANK is in the environment as well).
    ap.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        status = train(cfg)
        # srun forwards a second copy of a preemption signal; Python restores the default action
        # (terminate) during shutdown, so a late copy would kill a rank that exited cleanly.
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    except (ConfigError, ModelConfigError, TrainingError) as e:
        print(f"[train] error: {e}", file=sys.stderr, flush=True)
        return 2
    if status == STATUS_PREEMPTED:
        requeue_if_slurm(cfg, int(os.environ.get("RANK", "0")))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Every rank is done (train() ended with a barrier; checkpoints, logs and the tracker are
        # closed). Leave without C++ teardown: the communicators' background threads racing the
        # rendezvous store at interpreter exit occasionally abort a rank ("terminate called without an
        # active exception", exit -6) after a successful run, which a scheduler would count as failure.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
