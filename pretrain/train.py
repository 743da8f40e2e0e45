"""The training entry point and loop.

    python -m pretrain.train --config pretrain/configs/X.yaml [dotted.key=value ...]

Launched by torchrun, by the deepspeed launcher, by srun (SLURM variables are mapped in
parallel/slurm_env.py), or as one plain process. `Trainer.train` reads top to bottom: check what
can be refused, build, maybe resume, open the MLflow run, then per step: batch -> learning rate
-> executor step -> metrics -> non-finite guard -> maybe evaluate -> maybe checkpoint -> signals.
The pieces live in their own modules:

    parallel/build.py, parallel/step.py   the executor: how one step runs over the engine(s)
    pretrain/data.py                      the loaders, with the model's cost for the balancer
    pretrain/checkpoint.py, state.py      registered resumable state, tags, `latest`, retention
    pretrain/reshard.py                   resuming at another data-parallel size
    pretrain/metrics.py, evaluate.py      named metrics, MFU, the console line; evaluation
    pretrain/tracking.py                  MLflow from rank 0
    pretrain/signals.py, faults.py        preemption and STOP; fault injection for the tests

`Trainer.train()` returns a status: "completed", "preempted" (a signal asked for a checkpoint and
a requeue; `main` then runs `scontrol requeue` under SLURM when checkpoint.requeue is set) or
"stopped" (a STOP file in the run directory: stop for good, no requeue).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import torch

from parallel.distributed import (all_gather_object, barrier, broadcast_object, die_with_launcher, init_process_group,
                                  setup_env)
from pretrain.checkpoint import CheckpointManager
from pretrain.config import ExperimentConfig, dump_yaml, load_config
from pretrain.data import build_loader, feed_compression
from pretrain.errors import ConfigError, TrainingError
from pretrain.evaluate import Evaluator
from pretrain.faults import FaultInjector
from pretrain.metrics import StepReporter, TrainMetrics
from pretrain.reshard import tag_to_load
from pretrain.schedule import build_schedule
from pretrain.signals import SignalFlag, StopRequests
from pretrain.state import PerRank, RNGState, TrackingState, TrainState
from pretrain.summary import RunTimers, write_summary
from pretrain.tracking import open_tracking

STATUS_COMPLETED, STATUS_PREEMPTED, STATUS_STOPPED = "completed", "preempted", "stopped"


class Trainer:
    """One training run in one process (every rank runs its own Trainer)."""

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.info = setup_env()
        # Installed first: a preemption signal during start-up must not kill the process.
        self.signals = SignalFlag()
        self.signals.install()
        self.state, self.tracking = TrainState(), TrackingState()
        self.lease, self.lease_how = None, ""  # the run directory's lease, held by global rank 0
        self.resume_changes: dict = {}  # settings that differ from the checkpoint's config

    def log(self, msg: str) -> None:
        if self.info.rank == 0:
            print(f"[train] {msg}", flush=True)

    # ------------------------------------------------------------------ the run
    def train(self) -> str:
        """Runs (or resumes) the experiment; returns "completed", "preempted" or "stopped"."""
        try:
            status = self.run()
        except (ConfigError, TrainingError):
            self.release_run_dir()  # a deliberate stop: the user may start again at once
            raise
        self.release_run_dir()  # a crash (any other exception) leaves the lease to go stale
        return status

    def release_run_dir(self) -> None:
        if self.lease is not None:
            self.lease.release()

    def run(self) -> str:
        self.check()
        self.build()
        self.maybe_resume()
        self.write_run_files()  # after the resume: a run it refuses leaves the run directory's files as they were
        self.start_tracking()
        self.timers = RunTimers()
        self.start_step = self.state.step
        if self.state.step >= self.cfg.train.steps:
            if self.state.eval_pending and self.eval_due(self.state.step) and not self.completed_before():
                # the last attempt was signalled at the final step: it saved before evaluating
                self.log(f"step {self.state.step}: the final evaluation the last attempt left for a signal")
                self.evaluate(self.state.step)
                self.state.eval_pending = False
                return self.finish(STATUS_COMPLETED)
            self.log(f"nothing to do: checkpoint step {self.state.step} >= train.steps {self.cfg.train.steps}")
            self.tracker.finish()
            return STATUS_COMPLETED
        try:
            status = self.loop()
        except BaseException:
            # Whatever stops the loop (an error, Ctrl-C), the buffered metrics reach the store.
            self.tracker.finish("FAILED")
            raise
        return self.finish(status)

    def completed_before(self) -> bool:
        """Whether an earlier launch already completed this run at this step (its summary.json says
        so): the checkpoint's eval_pending cannot be cleared once the evaluation it owes is done."""
        done = {}
        if self.info.rank == 0:  # the one that wrote it; every rank must take the same branch
            try:
                with open(os.path.join(self.cfg.run_dir, "summary.json")) as f:
                    done = json.load(f)
            except (OSError, ValueError):
                pass
        done = broadcast_object(done)
        return done.get("status") == STATUS_COMPLETED and done.get("step") == self.state.step

    def loop(self) -> str:
        cfg, state = self.cfg, self.state
        batches = self.executor.batches(self.loader)
        while state.step < cfg.train.steps:
            state.step += 1
            step = state.step
            self.faults.step_start(step)
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            lr = self.schedule.apply(self.executor.param_groups, step, self.group_mults)
            res = self.executor.train_step(batch, inject_nan=self.faults.poisons_loss(step))
            t2 = time.perf_counter()
            self.timers.data_s += t1 - t0
            self.timers.step_s += t2 - t0
            self.timers.steps += 1
            state.bytes_seen += int(batch.global_bytes)
            self.reporter.step(step, batch, res, lr, t2 - t0, state.bytes_seen)
            self.guard_non_finite(step, res)
            if self.loader is not None and cfg.data.cost_balance and step % cfg.train.log_every == 0 \
                    and not res.skipped:
                feed_compression(self.loader, self.model_cfg, res.compression)
            status = self.end_of_step(step)
            if status:
                return status
        return STATUS_COMPLETED

    # ------------------------------------------------------------------ start-up
    def check(self) -> None:
        """Everything that can be refused, before any process group or engine exists."""
        from parallel.engine import resolve_ds_config
        from pretrain.model import HNetConfig

        cfg, info = self.cfg, self.info
        self.use_ds = cfg.train.engine == "deepspeed"
        if not self.use_ds and info.world_size > 1:
            raise ConfigError("train.engine=plain runs in one process; use train.engine=deepspeed with several ranks")
        self.model_cfg = HNetConfig.from_dict(cfg.model_dict())
        self.check_kernels()
        self.pipeline = self.check_pipeline()
        dp_world = info.world_size // cfg.parallel.pipeline_stages
        self.ds_config = resolve_ds_config(cfg, dp_world) if self.use_ds else None
        if self.pipeline:
            from parallel.build import pipeline_ds_config

            pipeline_ds_config(cfg, self.ds_config)  # refuses a DeepSpeed file that is not ZeRO-3, now
        self.ckpts = CheckpointManager(cfg.checkpoint_dir(), cfg.checkpoint.keep_last, cfg.checkpoint.keep_every,
                                       info.rank)
        self.resume_tag, self.resume_meta = self.ckpts.resume_point(self.model_cfg.to_dict(), cfg.train.engine,
                                                                    self.pipeline)
        self.take_run_dir()

    def take_run_dir(self) -> None:
        """The run directory's lease (pretrain/lease.py): rank 0 takes it, the other ranks wait
        until it names this launch; a live other launch is refused on every rank, before any
        process group exists. Under torchrun, ranks also end when their launcher is gone."""
        from pretrain.lease import RunLease

        t = self.cfg.train
        die_with_launcher(self.info)
        lease = RunLease(self.cfg.run_dir, t.lease_stale_s, t.lease_heartbeat_s)
        if self.info.rank != 0:
            lease.wait_for_own_launch(timeout_s=max(120.0, 2 * t.lease_stale_s))
            return
        how = lease.acquire()
        self.lease, self.lease_how = lease, how
        if how.startswith(("taken over", "taken back")):
            self.log(f"run directory lease {how}")

    def check_kernels(self) -> None:
        """Which fused kernels this run uses, and why not the others (logged, tracked as
        kernels.*); on CUDA a missing one stops the run unless train.require_fused=false."""
        from pretrain.model import kernels

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        self.kernels = kernels.status(device_type)
        for name, state in self.kernels.items():
            self.log(f"kernel {name}: {state}")
        try:
            kernels.check_required(device_type, self.cfg.train.require_fused)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None

    def check_pipeline(self) -> dict | None:
        """The pipeline layout ({"stages", "levels"}), or None without one; bad values are refused."""
        from parallel.pipeline import split_levels

        p, world = self.cfg.parallel.pipeline_stages, self.info.world_size
        if p == 1:
            return None
        if world % p:
            raise ConfigError(f"parallel.pipeline_stages={p}: the world size {world} is not divisible by it "
                              f"(world = pipeline_stages x data-parallel size)")
        try:
            levels = split_levels(self.model_cfg, p, self.cfg.parallel.pipeline_levels)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return {"stages": p, "levels": levels}

    def build(self) -> None:
        """Process group, run directory, executor, data, schedule; registers the resumable state."""
        from parallel.build import build_executor, device_for

        cfg, info = self.cfg, self.info
        device = device_for(info.local_rank)  # a LOCAL_RANK past the visible GPUs fails here, named
        if device.type == "cuda":
            # this rank's GPU before any collective (PyTorch's advice for NCCL): DeepSpeed sets it
            # only in deepspeed.initialize, and a collective before that would put every rank on cuda:0
            torch.cuda.set_device(device)
        init_process_group(info, use_deepspeed=self.use_ds, timeout_s=cfg.train.collective_timeout_s)
        if cfg.train.deterministic:
            deterministic_cuda_env(torch.cuda.is_available())
            torch.use_deterministic_algorithms(True)
        os.makedirs(cfg.run_dir, exist_ok=True)
        self.config_yaml = dump_yaml(cfg)
        self.executor, self.group_mults, self.level_mults = build_executor(cfg, info, self.model_cfg, self.ds_config)
        self.loader = self.make_loader()
        self.schedule = build_schedule(cfg, cfg.train.steps)
        self.evaluator = Evaluator(self.executor, lambda: self.make_loader(eval_split=True), self.model_cfg.num_stages,
                                   cfg.train.eval_max_steps)
        self.faults = FaultInjector(cfg.debug, info.rank, self.log)
        self.stops = StopRequests(cfg.run_dir, self.signals, self.lease.lost if self.lease else None)
        # Everything that decides what happens next, saved in every checkpoint and restored on
        # resume, in this order (the RNG's fallback reseed reads the restored step).
        self.ckpts.register_storage(self.executor)
        self.ckpts.register("train", self.state)
        if self.loader is not None:  # a pipeline's deeper ranks read no data
            self.ckpts.register("data", self.loader)
        self.ckpts.register("schedule", self.schedule)
        self.ckpts.register("rng", PerRank(RNGState(cfg.train.seed, info.rank, self.state), info.rank,
                                           info.world_size))
        self.ckpts.register("tracking", self.tracking)

    def make_loader(self, eval_split: bool = False):
        """The data of this rank (None on ranks that read none: a pipeline's deeper stages)."""
        ex = self.executor
        if not ex.reads_data:
            return None
        return build_loader(self.cfg, self.model_cfg, ex.data_rank, ex.data_world, eval_split, group=ex.data_group)

    def write_run_files(self) -> None:
        """The resolved config (and DeepSpeed config) in the run directory, from rank 0."""
        if self.info.rank != 0:
            return
        print("[train] resolved config:\n" + self.config_yaml, flush=True)
        with open(os.path.join(self.cfg.run_dir, "config.yaml"), "w") as f:
            f.write(self.config_yaml)
        if self.ds_config is not None:
            with open(os.path.join(self.cfg.run_dir, "ds_config.json"), "w") as f:
                json.dump(self.ds_config, f, indent=1)

    def maybe_resume(self) -> None:
        """Restores every registered state from `latest` (converted first if the world size changed)."""
        if not self.resume_tag:
            return
        info, meta = self.info, self.resume_meta
        saved_world = meta["world_size"] if self.use_ds else info.world_size
        load_tag, universal = tag_to_load(self.ckpts.root, self.resume_tag, saved_world, info.rank, info.world_size,
                                          self.cfg.checkpoint.auto_reshard, self.cfg.checkpoint.reshard_timeout_s,
                                          log=self.log)
        self.ckpts.restore(load_tag, universal=universal)
        self.log(f"resuming from checkpoint {self.ckpts.root}/{load_tag} at step {self.state.step} "
                 f"({self.state.bytes_seen:,} bytes seen; written by {meta['world_size']} ranks, now {info.world_size})")
        self.resume_changes = self.ckpts.changed_settings(self.resume_tag, self.cfg.to_dict())
        for key, (old, new) in self.resume_changes.items():
            moves_lr = key.startswith(("train.steps", "optim.", "schedule."))
            self.log(f"resumed with a changed setting: {key} {old!r} -> {new!r}"
                     + (" (the schedule follows the new value)" if moves_lr else ""))

    def start_tracking(self) -> None:
        """The MLflow run (rank 0; the same run as before a resume) and the metric reporter."""
        cfg, info = self.cfg, self.info
        metrics = TrainMetrics(self.model_cfg, info.world_size, cfg.train.precision, cfg.train.peak_tflops)
        params = {"config": cfg.to_dict(), "world_size": info.world_size, "ds": self.ds_config or {"engine": "plain"},
                  "model_resolved": self.model_cfg.to_dict(), "lr_multipliers": self.level_mults,
                  "perf": {"peak_tflops": metrics.peak, "peak_source": metrics.peak_source},
                  "kernels": self.kernels}
        artifacts = {"config.yaml": self.config_yaml}
        if self.ds_config is not None:
            artifacts["ds_config.json"] = json.dumps(self.ds_config, indent=1)
        self.tracker = open_tracking(cfg, info.rank, self.tracking.run_id,
                                     self.state.step if self.resume_tag else None, params, artifacts, self.log)
        self.tracking.run_id = broadcast_object(self.tracker.run_id)  # the same client state on every rank
        if self.resume_changes:
            self.tracker.set_tags({f"resume_step_{self.state.step}.changed.{k}": f"{o!r} -> {n!r}"
                                   for k, (o, n) in self.resume_changes.items()})
        if self.lease_how.startswith(("taken over", "taken back")):
            self.tracker.set_tags({f"lease.taken_at_step_{self.state.step}": self.lease_how})
        if metrics.peak:
            self.log(f"perf/mfu against {metrics.peak:g} TFLOP/s per device ({metrics.peak_source})")
        self.reporter = StepReporter(metrics, self.tracker, cfg.run_dir, info.rank, cfg.train.steps,
                                     cfg.train.log_every, cfg.debug.log_keys, self.state.step, time.perf_counter,
                                     log=self.log)

    # ------------------------------------------------------------------ per step
    def guard_non_finite(self, step: int, res) -> None:
        """A non-finite loss or gradient skipped the update; too many in a row stop the run."""
        if not res.skipped:
            self.state.bad_steps_in_a_row = 0
            return
        self.state.bad_steps_in_a_row += 1
        bad = self.state.bad_steps_in_a_row
        keys = [k for ks in all_gather_object(res.bad_keys) for k in ks]
        self.log(f"step {step}: non-finite loss or gradient (loss {res.loss:.4g}, grad norm {res.grad_norm:.4g}); "
                 f"update skipped ({bad} in a row); micro-batch keys: {keys[:8]}")
        if bad >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"stopping at step {step}: {bad} consecutive steps with a non-finite loss or gradient "
                f"(train.max_bad_steps={self.cfg.train.max_bad_steps}); last bad micro-batches: {keys[:16]}")

    def eval_due(self, step: int) -> bool:
        t = self.cfg.train
        return bool(self.cfg.data.eval_index) and ((t.eval_every and step % t.eval_every == 0) or step == t.steps)

    def evaluate(self, step: int) -> None:
        if hasattr(self.loader, "settle"):
            self.loader.settle()  # the held-out loaders gather over the training loader's group
        t0 = time.perf_counter()
        ev = self.evaluator.run()
        self.timers.eval_s += time.perf_counter() - t0
        self.reporter.eval(step, ev)
        self.draw_chunks(step, ev)

    def draw_chunks(self, step: int, ev: dict) -> None:
        """The held-out passage with every stage's boundaries, as an HTML artifact (rank 0)."""
        from pretrain.chunks import boundary_html

        if self.info.rank != 0 or self.evaluator.picture is None:
            return
        data, per_stage = self.evaluator.picture
        comp = [ev[f"eval/compression/stage{s}"] for s in range(self.model_cfg.num_stages)]
        page = boundary_html(data, per_stage, f"held-out passage at step {step}", comp)
        os.makedirs(os.path.join(self.cfg.run_dir, "chunks"), exist_ok=True)
        with open(os.path.join(self.cfg.run_dir, "chunks", f"step{step:08d}.html"), "w") as f:
            f.write(page)
        self.tracker.log_artifact_text(f"chunks/step{step:08d}.html", page)

    def end_of_step(self, step: int) -> str | None:
        """Evaluates and checkpoints on their cadences and at the end; when any rank was signalled
        or STOP exists, checkpoints first and does not evaluate (a preemption's grace time is for the
        checkpoint, and a full held-out pass can outlast it). Returns the status to leave with, or
        None to go on."""
        signalled, stopped, lease_lost = self.stops.poll()  # all ranks agree: they save and leave at one step
        if lease_lost:
            raise TrainingError(f"stopping at step {step} without a checkpoint: another launch took over the "
                                f"lease of {self.cfg.run_dir} (it judged ours stale); that launch owns it now")
        final = step == self.cfg.train.steps
        if not (signalled or stopped):
            if self.eval_due(step):
                self.evaluate(step)
            every = self.cfg.checkpoint.every
            if (every and step % every == 0) or final:
                self.save_checkpoint(step)
            self.faults.after_checkpoint(step, lambda: self.tracker.flush(wait=True))
            return None
        skipped_eval = self.eval_due(step)
        if skipped_eval:
            self.log(f"step {step}: evaluation skipped, {'a signal' if signalled else 'STOP'} came first"
                     + ("; the next launch of this run does it" if final else ""))
        self.state.eval_pending = final and skipped_eval  # saved with the checkpoint below
        self.save_checkpoint(step)
        self.faults.after_checkpoint(step, lambda: self.tracker.flush(wait=True))
        if final and not skipped_eval:
            return None  # the run is complete: nothing is left for a requeue or a relaunch
        if stopped:
            self.log(f"STOP file found in {self.cfg.run_dir}: stopping for good at step {step}")
            return STATUS_STOPPED
        self.log(f"signal received: checkpoint at step {step} written, leaving for a requeue")
        return STATUS_PREEMPTED

    def save_checkpoint(self, step: int) -> None:
        self.tracker.flush(wait=True)  # the steps up to this checkpoint are in the store before it exists
        t0 = time.perf_counter()  # (that wait counts as tracking time, not checkpoint time)
        cfg, info = self.cfg, self.info
        meta = {"step": step, "bytes_seen": self.state.bytes_seen, "world_size": info.world_size,
                "engine": cfg.train.engine, "model": self.model_cfg.to_dict(), "config_hash": cfg.hash(),
                "mlflow_run_id": self.tracking.run_id, "time": time.time(), "pipeline": self.pipeline}
        extra = {"config": cfg.to_dict(), "config_hash": cfg.hash(), "world_size": info.world_size}
        tag = self.ckpts.save_registered(step, meta, self.config_yaml, extra, crash_hook=self.faults.save_hook(step))
        self.timers.ckpt_s += time.perf_counter() - t0
        self.log(f"checkpoint {self.ckpts.root}/{tag} written in {time.perf_counter() - t0:.1f} s")

    # ------------------------------------------------------------------ the end
    def finish(self, status: str) -> str:
        self.tracker.flush()
        summary = self.timers.summary(status, self.state.step, self.start_step, self.info.world_size,
                                      self.tracking.run_id, self.tracker)
        self.tracker.finish("FINISHED" if status == STATUS_COMPLETED else "KILLED")
        if self.info.rank == 0:
            write_summary(self.cfg.run_dir, summary)
            self.log(f"{status} at step {self.state.step}: {summary['step_time_s']:.3f} s/step, data "
                     f"{summary['data_share']:.1%}, tracking {summary['tracking_share']:.2%}, checkpoints "
                     f"{summary['ckpt_share']:.1%} of wall time")
        self.reporter.close()
        if self.loader is not None:
            self.loader.close()
        barrier()
        return status


def deterministic_cuda_env(cuda: bool, env=os.environ) -> None:
    """cuBLAS is deterministic only with a fixed workspace (PyTorch's reproducibility notes):
    without CUBLAS_WORKSPACE_CONFIG, torch.use_deterministic_algorithms makes the first CUDA
    matmul raise. Set before cuBLAS starts (a value the user set is kept)."""
    if cuda:
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def train(cfg: ExperimentConfig) -> str:
    """Runs (or resumes) the experiment; returns "completed", "preempted" or "stopped"."""
    return Trainer(cfg).train()


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
    except (ConfigError, TrainingError) as e:
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
