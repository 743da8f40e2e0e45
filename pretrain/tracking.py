"""MLflow tracking from rank 0: buffered metrics sent with `log_batch`, one run across restarts.

Other ranks get a tracker whose methods do nothing, so the loop calls it unconditionally and
only rank 0 ever opens the store (a fresh SQLite database migrates its schema once, from one
process). Metrics are buffered and sent every `flush_every` steps, before every checkpoint and
at exit. `seconds` accumulates the wall time spent inside the tracker (the cost reported as a
share of step time).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from importlib import metadata

from pretrain.config import flatten

# recorded as MLflow params (versions.*); the fused-kernel packages read "absent" where not installed
PACKAGES = ("torch", "deepspeed", "mlflow", "webdataset", "numpy", "pyarrow", "mamba_ssm", "causal_conv1d",
            "flash_attn", "triton")
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH_LIMIT = 1000  # metrics per log_batch call accepted by MLflow


def default_tracking_uri(config_uri: str = "") -> str:
    """Config first, then $MLFLOW_TRACKING_URI, then sqlite:///mlflow.db in the working directory."""
    if config_uri:
        return config_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + os.path.abspath("mlflow.db")


def git_commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def slurm_tags(env: dict | None = None) -> dict[str, str]:
    env = os.environ if env is None else env
    tags = {}
    for tag, var in (("slurm.job_id", "SLURM_JOB_ID"), ("slurm.restart_count", "SLURM_RESTART_COUNT"),
                     ("slurm.nodelist", "SLURM_JOB_NODELIST")):
        if env.get(var):
            tags[tag] = env[var]
    return tags


class NullTracker:
    """What ranks other than 0 (and runs with tracking off) get."""

    run_id: str | None = None
    seconds: float = 0.0
    uri: str = ""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def flush(self) -> None:
        pass

    def finish(self, status: str = "FINISHED") -> None:
        pass


class MlflowTracker(NullTracker):
    def __init__(self, uri: str, experiment: str, run_id: str | None = None, run_name: str = "",
                 flush_every: int = 50, resume_step: int | None = None):
        t0 = time.perf_counter()
        from mlflow.entities import Metric, Param, RunTag
        from mlflow.tracking import MlflowClient

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri = uri
        self.flush_every = max(1, flush_every)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            artifact_root = None
            if uri.startswith("sqlite:///"):
                # Artifacts next to the database file, not in whatever directory the job started in.
                db = uri[len("sqlite:///"):]
                artifact_root = "file://" + os.path.join(os.path.dirname(os.path.abspath(db)), "mlartifacts")
            exp_id = self.client.create_experiment(experiment, artifact_location=artifact_root)
        else:
            exp_id = exp.experiment_id
        self.resumed = run_id is not None
        if run_id is not None:
            run = self.client.get_run(run_id)  # raises if the store lost it: better than a silent new run
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run.info.run_id
            restarts = int(run.data.tags.get("restart_count", "0")) + 1
            self.client.set_tag(run_id, "restart_count", str(restarts))
            if resume_step is not None:
                # Metrics flushed between that checkpoint and a hard kill are logged again by this
                # attempt (MLflow cannot delete them): per step, the newest value is the one the
                # run continued from. The tag says from where each restart re-logged.
                self.client.set_tag(run_id, f"restart_{restarts}.from_step", str(resume_step))
        else:
            tags = {"restart_count": "0"}
            if resume_step is not None:  # a checkpoint without a run id (tracking was off, or another store)
                tags["resumed_from_step"] = str(resume_step)
            run = self.client.create_run(exp_id, run_name=run_name or None, tags=tags)
            self.run_id = run.info.run_id
        tags = slurm_tags()
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._buffer: list = []
        self._last_step = None
        self._steps_buffered = 0
        self.seconds = time.perf_counter() - t0
        self.setup_seconds = self.seconds

    # ---------------------------------------------------------------- params / artifacts
    def log_params(self, params: dict) -> None:
        """Params are immutable in MLflow: on a resumed run only keys not yet logged are sent."""
        t0 = time.perf_counter()
        flat = {k: _param_str(v) for k, v in flatten(params).items()}
        if self.resumed:
            existing = self.client.get_run(self.run_id).data.params
            flat = {k: v for k, v in flat.items() if k not in existing}
        items = [self._Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])
        self.seconds += time.perf_counter() - t0

    def log_artifact_text(self, name: str, text: str) -> None:
        t0 = time.perf_counter()
        self.client.log_text(self.run_id, text, name)
        self.seconds += time.perf_counter() - t0

    # ---------------------------------------------------------------- metrics
    def log(self, metrics: dict, step: int) -> None:
        t0 = time.perf_counter()
        ts = int(time.time() * 1000)
        for k, v in metrics.items():
            if v is None:
                continue
            self._buffer.append(self._Metric(k, float(v), ts, int(step)))
        if step != self._last_step:
            self._steps_buffered += 1
            self._last_step = step
        self.seconds += time.perf_counter() - t0
        if self._steps_buffered >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        t0 = time.perf_counter()
        buf, self._buffer = self._buffer, []
        for i in range(0, len(buf), BATCH_LIMIT):
            self.client.log_batch(self.run_id, metrics=buf[i:i + BATCH_LIMIT])
        self._steps_buffered = 0
        self.seconds += time.perf_counter() - t0

    def finish(self, status: str = "FINISHED") -> None:
        self.flush()
        t0 = time.perf_counter()
        self.client.set_terminated(self.run_id, status=status)
        self.seconds += time.perf_counter() - t0


def _param_str(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s[:MAX_PARAM_LEN]


def open_tracking(cfg, rank: int, run_id: str | None, resume_step: int | None, params: dict,
                  artifacts: dict[str, str], log=print) -> NullTracker:
    """The run's tracker (rank 0; a no-op elsewhere or with tracking off), with its params (the
    commit and package versions added) and text artifacts logged."""
    tracker = make_tracker(cfg, rank, run_id, resume_step)
    if tracker.run_id:
        tracker.log_params({**params, "git_commit": git_commit(), "versions": package_versions()})
        for name, text in artifacts.items():
            tracker.log_artifact_text(name, text)
        log(f"MLflow run {tracker.run_id} in {tracker.uri}")
    return tracker


def make_tracker(cfg, rank: int, run_id: str | None, resume_step: int | None = None) -> NullTracker:
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    uri = default_tracking_uri(cfg.tracking.uri)
    return MlflowTracker(uri, cfg.tracking.experiment, run_id=run_id,
                         run_name=cfg.tracking.run_name or os.path.basename(os.path.abspath(cfg.run_dir)),
                         flush_every=cfg.tracking.flush_every, resume_step=resume_step)
