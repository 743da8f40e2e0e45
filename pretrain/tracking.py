"""MLflow tracking from rank 0: buffered metrics sent with `log_batch`, one run across restarts.

Other ranks get a tracker whose methods do nothing, so the loop calls it unconditionally and
only rank 0 ever opens the store (a fresh SQLite database migrates its schema once, from one
process). Metrics are buffered and sent every `flush_every` steps, before every checkpoint and
at exit. `seconds` accumulates the wall time the training loop spends inside the tracker (the
cost reported as a share of step time).

Tracking never stops training, and the steps do not wait for the store. Rank 0's calls only
queue work: one sender thread talks to the store, in order, while the steps go on. A store that
blocks (SQLite holds a locked database for 20 s per write before MLflow gives up; a slow server)
blocks that thread, not the loop. The one wait is before a checkpoint: the metrics up to it should be in the
store by the time the checkpoint exists (a run resumed after a SIGKILL logs only the steps after
it), so the loop waits there for sends in progress, but never for a store that is failing.

A failed send (a server that went away, "database is locked" when several jobs share one SQLite
file, a removed file) keeps the metrics queued and is retried after a backoff (1, 2, 4 ... 60 s);
after `tracking.max_failures` failures in a row, at the end of a run whose last send failed, or
when the store cannot be opened at start, the run goes on offline: every metric, param and tag
from then on is appended to RUN_DIR/unsent_metrics.jsonl, which
`python -m pretrain.tracking replay RUN_DIR` sends later (into the same MLflow run when its id
is known). The default store stays one SQLite file in the working directory, so that the runs
of a project compare in one place; jobs that share it wait for its lock and, past SQLite's
timeout, retry as above.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from importlib import metadata

from pretrain.config import flatten

# recorded as MLflow params (versions.*); the fused-kernel packages read "absent" where not installed
PACKAGES = ("torch", "deepspeed", "mlflow", "webdataset", "numpy", "pyarrow", "mamba_ssm", "causal_conv1d",
            "flash_attn", "triton")
MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
BATCH_LIMIT = 1000  # metrics per log_batch call accepted by MLflow
UNSENT_FILE = "unsent_metrics.jsonl"
MAX_BACKOFF_S = 60.0
OPEN_ATTEMPTS = 3  # tries to open the store at start (1 s, 2 s apart) before training offline
FLUSH_WAIT_S = 120.0  # before a checkpoint, how long to wait for a send in progress (MLflow's HTTP timeout)
FINISH_WAIT_S = 300.0  # at the end, how long to wait for a send in progress before keeping the rest offline


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
            # imported from a source tree without package metadata (mamba_ssm's Triton kernels
            # loaded from its sources, as scripts/gpu_check.sh does): say so, not "absent"
            mod = sys.modules.get(name)
            where = getattr(mod, "__path__", None) or [getattr(mod, "__file__", None)]
            out[name] = f"sources at {where[0]}" if mod is not None and where[0] else "absent"
    return out


def slurm_tags(env: dict | None = None) -> dict[str, str]:
    env = os.environ if env is None else env
    tags = {}
    for tag, var in (("slurm.job_id", "SLURM_JOB_ID"), ("slurm.restart_count", "SLURM_RESTART_COUNT"),
                     ("slurm.nodelist", "SLURM_JOB_NODELIST")):
        if env.get(var):
            tags[tag] = env[var]
    return tags


@contextlib.contextmanager
def _sqlite_store_lock(db: str | None):
    """An exclusive lock on DB.open-lock beside a SQLite store's file (nothing when db is None)."""
    if db is None:
        yield
        return
    import fcntl

    os.makedirs(os.path.dirname(db), exist_ok=True)
    with open(db + ".open-lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_client(uri: str, experiment: str | None = None):
    """An MlflowClient for URI and, when EXPERIMENT is named, its id (the experiment is made if
    missing). Every process that opens a store goes through here.

    MLflow builds and migrates a SQLite store's schema as the client is made. Two processes
    doing that at once on a fresh file can leave it half-migrated for good ("table
    _alembic_tmp_... already exists" for every later reader), and two creating one experiment
    at once collide on its name. For sqlite:/// stores both happen under one exclusive flock on
    DB.open-lock, so jobs that start together open the store one after the other."""
    from mlflow.tracking import MlflowClient

    db = os.path.abspath(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    with _sqlite_store_lock(db):
        client = MlflowClient(tracking_uri=uri)
        if experiment is None:
            return client, None
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            return client, exp.experiment_id
        # Artifacts next to the database file, not in whatever directory the job started in.
        artifact_root = "file://" + os.path.join(os.path.dirname(db), "mlartifacts") if db else None
        return client, client.create_experiment(experiment, artifact_location=artifact_root)


class NullTracker:
    """What ranks other than 0 (and runs with tracking off) get."""

    run_id: str | None = None
    seconds: float = 0.0
    uri: str = ""

    def log(self, metrics: dict, step: int) -> None:
        pass

    def flush(self, wait: bool = False) -> None:
        pass

    def wait_sent(self, timeout: float = 0.0) -> bool:
        return True

    def finish(self, status: str = "FINISHED") -> None:
        pass

    def set_tags(self, tags: dict[str, str]) -> None:
        pass

    def log_artifact_text(self, name: str, text: str) -> None:
        pass


class MlflowTracker(NullTracker):
    def __init__(self, uri: str, experiment: str, run_id: str | None = None, run_name: str = "",
                 flush_every: int = 50, resume_step: int | None = None, run_dir: str = ".", max_failures: int = 5,
                 warn=print):
        t0 = time.perf_counter()
        self.run_dir, self.max_failures, self.warn = run_dir, max(1, max_failures), warn
        self.offline: OfflineLog | None = None
        from mlflow.entities import Metric, Param, RunTag

        self._Metric, self._Param, self._RunTag = Metric, Param, RunTag
        self.uri = uri
        self.flush_every = max(1, flush_every)
        self.client, exp_id = open_client(uri, experiment)
        run = _existing_run(self.client, run_id) if run_id is not None else None
        if run_id is not None and run is None:
            # The store answers but does not hold the checkpoint's run: resumed against another
            # store (tracking.uri, $MLFLOW_TRACKING_URI or the working directory changed), or its
            # database was replaced. Going offline would lose the rest of the run; a new run here
            # that names the old one keeps it comparable.
            warn(f"[tracking] warning: MLflow run {run_id} of this checkpoint is not in {uri}; logging to a new "
                 f"run there, tagged continues_run_id={run_id} (the earlier steps stay in the store that has it)")
        self.resumed = run is not None
        if run is not None:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id = run.info.run_id
            restarts = int(run.data.tags.get("restart_count", "0")) + 1
            self.client.set_tag(run_id, "restart_count", str(restarts))
            # when this attempt began: what it logs after this instant supersedes earlier values of
            # the same steps, and the gap before it was queue time, not training (pretrain.compare)
            self.client.set_tag(run_id, f"restart_{restarts}.started_ms", str(int(time.time() * 1000)))
            if resume_step is not None:
                # Metrics flushed between that checkpoint and a hard kill are logged again by this
                # attempt (MLflow cannot delete them): per step, the newest value is the one the
                # run continued from. The tag says from where each restart re-logged.
                self.client.set_tag(run_id, f"restart_{restarts}.from_step", str(resume_step))
        else:
            tags = {"restart_count": "0"}
            if resume_step is not None:  # a checkpoint without a run id (tracking was off), or another store
                tags["resumed_from_step"] = str(resume_step)
            if run_id is not None:
                tags["continues_run_id"] = run_id
            run = self.client.create_run(exp_id, run_name=run_name or None, tags=tags)
            self.run_id = run.info.run_id
            restarts = 0
        tags = slurm_tags()
        # slurm.* say where the run is now; restart_N.slurm.* keep where each attempt ran (a
        # requeue may land on other nodes, a resumed run may be another job).
        tags.update({f"restart_{restarts}.{k}": v for k, v in list(tags.items())})
        if tags:
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        self._buffer: list = []  # metrics logged since the last flush, not yet handed to the sender
        self._last_step = None
        self._steps_buffered = 0
        self._init_sender()
        self._sender = threading.Thread(target=self._send_loop, name="mlflow-sender", daemon=True)
        self._sender.start()
        self.seconds = time.perf_counter() - t0
        self.setup_seconds = self.seconds

    def _init_sender(self) -> None:
        # Shared with the sender thread, under `_cv`: the queue of store operations (in order), whether
        # one is being sent, consecutive failures and when to retry, and whether the run is ending.
        self._cv = threading.Condition()
        self._queue: deque[_Op] = deque()
        self._in_flight = False
        self._failures, self._retry_at = 0, 0.0
        self._closing = False
        self._sender: threading.Thread | None = None
        self._sender_gone = False

    # ---------------------------------------------------------------- params / artifacts
    def log_params(self, params: dict) -> None:
        """Params are immutable in MLflow: on a resumed run only keys not yet logged are sent."""
        flat = {k: _param_str(v) for k, v in flatten(params).items()}

        def send() -> None:
            todo = flat
            if self.resumed:
                existing = self.client.get_run(self.run_id).data.params
                todo = {k: v for k, v in flat.items() if k not in existing}
            items = [self._Param(k, v) for k, v in todo.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])

        self._call("logging params", send, {"kind": "params", "params": flat})

    def set_tags(self, tags: dict[str, str]) -> None:
        tags = {k: str(v)[:MAX_PARAM_LEN] for k, v in tags.items()}
        self._call("setting tags", lambda: self.client.log_batch(
            self.run_id, tags=[self._RunTag(k, v) for k, v in tags.items()]), {"kind": "tags", "tags": tags})

    def log_artifact_text(self, name: str, text: str) -> None:
        self._call(f"logging artifact {name}", lambda: self.client.log_text(self.run_id, text, name))

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
        if self._steps_buffered >= self.flush_every or (self.offline is not None and self._buffer):
            self.flush()

    def flush(self, wait: bool = False) -> None:
        """Hands the buffered metrics to the sender; with `wait` (before a checkpoint), also waits
        until they are sent (see `wait_sent`)."""
        t0 = time.perf_counter()
        with self._cv:
            if self._buffer:
                self._enqueue(_Op("metrics", metrics=self._buffer))
            self._buffer, self._steps_buffered = [], 0
        self.seconds += time.perf_counter() - t0
        if wait:
            self.wait_sent()

    def wait_sent(self, timeout: float = FLUSH_WAIT_S) -> bool:
        """Waits until everything queued so far is in the store; True if it is. Returns False at
        once when the store is failing (a send waits for its retry, or tracking went offline), and
        after `timeout` when a send does not return."""
        t0 = time.perf_counter()
        with self._cv:
            done = self._cv.wait_for(lambda: self.offline is not None or self._failures > 0 or self._sender_gone
                                     or not (self._queue or self._in_flight), timeout)
            sent = done and self.offline is None and not self._failures and not self._queue and not self._in_flight
        self.seconds += time.perf_counter() - t0
        if not done:
            self.warn(f"[tracking] warning: a send to {self.uri} has not returned after {timeout:.0f} s; training "
                      f"goes on, the metrics stay queued")
        return sent

    def _call(self, what: str, fn, offline_record: dict | None = None) -> None:
        """A param, tag or artifact call: sent in order with the metrics; a failure is reported and
        its record kept for a replay, but not retried."""
        t0 = time.perf_counter()
        with self._cv:
            self._enqueue(_Op(what, fn=fn, record=offline_record))
        self.seconds += time.perf_counter() - t0

    def _enqueue(self, op: _Op) -> None:  # holding _cv
        if self.offline is not None:
            self._spill(op)
        else:
            self._queue.append(op)
            self._cv.notify_all()

    # ---------------------------------------------------------------- the sender thread
    def _send_loop(self) -> None:
        try:
            self._send_all()
        except BaseException as e:  # a defect here must not hang a checkpoint that waits for a send
            self.warn(f"[tracking] warning: the MLflow sender stopped ({type(e).__name__}: {e}); tracking goes "
                      f"offline")
            with self._cv:
                if self.offline is None:
                    self.go_offline(f"the sender stopped: {type(e).__name__}")
        finally:
            with self._cv:
                self._sender_gone = True
                self._cv.notify_all()

    def _send_all(self) -> None:
        while True:
            with self._cv:
                op = self._next_op()
                if op is None:
                    return
                self._in_flight = True
                batch = op.metrics[:BATCH_LIMIT] if op.metrics is not None else None
            error = None
            try:
                if batch is not None:
                    self.client.log_batch(self.run_id, metrics=batch)
                else:
                    op.fn()
            except Exception as e:  # any store error: tracking must not stop training
                error = e
            with self._cv:
                self._in_flight = False
                self._sent(op, batch, error)
                self._cv.notify_all()

    def _next_op(self) -> _Op | None:
        """Waits (holding _cv) for the next operation to send; None once the run has ended."""
        while True:
            if self.offline is not None or not self._queue:
                if self._closing:
                    return None
                self._cv.wait()
                continue
            wait = self._retry_at - time.monotonic()
            if self._failures and wait > 0:
                if self._closing:  # the last chance to send has gone: keep what did not go
                    self.go_offline("the final send failed")
                    return None
                self._cv.wait(wait)
                continue
            return self._queue[0]

    def _sent(self, op: _Op, batch: list | None, error: Exception | None) -> None:  # holding _cv
        if self.offline is not None:  # finish gave up waiting for this send and spilled the queue, this op too
            return
        if batch is None:  # a param, tag or artifact call
            self._queue.popleft()
            if error is not None:
                self.warn(f"[tracking] warning: {op.what} failed ({type(error).__name__}: {str(error)[:200]}); "
                          f"training goes on")
                if op.record:
                    OfflineLog(self.run_dir, self.run_id, self.uri).write(op.record)
            return
        if error is None:
            del op.metrics[:len(batch)]
            if not op.metrics:
                self._queue.popleft()
            self._failures = 0
            return
        self._failures += 1
        backoff = min(MAX_BACKOFF_S, 2.0 ** (self._failures - 1))
        self._retry_at = time.monotonic() + backoff
        msg = f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"
        if self._failures >= self.max_failures:
            self.go_offline(f"{self._failures} failed sends in a row, the last: {msg}")
        else:
            queued = sum(len(o.metrics) for o in self._queue if o.metrics is not None)
            self.warn(f"[tracking] warning: sending metrics to {self.uri} failed ({msg}); {queued} kept, retry in "
                      f"{backoff:.0f} s ({self._failures}/{self.max_failures})")

    def go_offline(self, why: str) -> None:  # holding _cv
        """From now on everything goes to RUN_DIR/unsent_metrics.jsonl (replay it later)."""
        self.offline = OfflineLog(self.run_dir, self.run_id, self.uri)
        self.warn(f"[tracking] warning: MLflow tracking is offline for the rest of this run ({why}); metrics go to "
                  f"{self.offline.path}: send them later with python -m pretrain.tracking replay {self.run_dir}")
        while self._queue:
            self._spill(self._queue.popleft())
        self._cv.notify_all()

    def _spill(self, op: _Op) -> None:  # holding _cv, offline
        if op.metrics is not None:
            self.offline.metrics(op.metrics)
        elif op.record:
            self.offline.write(op.record)

    def finish(self, status: str = "FINISHED") -> None:
        """Sends what is queued and ends the MLflow run; what cannot be sent is kept offline."""
        t0 = time.perf_counter()
        self.flush()
        self._call("ending the MLflow run", lambda: self.client.set_terminated(self.run_id, status=status),
                   {"kind": "status", "status": status})
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        if self._sender is not None:
            self._sender.join(FINISH_WAIT_S)
        with self._cv:
            if self._queue and self.offline is None:  # a send that does not return, or a second finish
                self.go_offline(f"a send still had not returned after {FINISH_WAIT_S:.0f} s"
                                if self._sender is not None and self._sender.is_alive() else "the sender had ended")
        self.seconds += time.perf_counter() - t0


class _Op:
    """One store operation: a list of metrics (sent BATCH_LIMIT at a time, retried) or a call."""

    __slots__ = ("what", "metrics", "fn", "record")

    def __init__(self, what: str, metrics: list | None = None, fn=None, record: dict | None = None):
        self.what, self.metrics, self.fn, self.record = what, metrics, fn, record


def _existing_run(client, run_id: str):
    """The run, or None when the store answers that it has no such run (other errors raise)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def _param_str(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s[:MAX_PARAM_LEN]


def open_tracking(cfg, rank: int, run_id: str | None, resume_step: int | None, params: dict,
                  artifacts: dict[str, str], log=print) -> NullTracker:
    """The run's tracker (rank 0; a no-op elsewhere or with tracking off), with its params (the
    commit and package versions added) and text artifacts logged."""
    tracker = make_tracker(cfg, rank, run_id, resume_step)
    if isinstance(tracker, MlflowTracker):
        tracker.log_params({**params, "git_commit": git_commit(), "versions": package_versions()})
        for name, text in artifacts.items():
            tracker.log_artifact_text(name, text)
        log(f"MLflow run {tracker.run_id} in {tracker.uri}")
    return tracker


def make_tracker(cfg, rank: int, run_id: str | None, resume_step: int | None = None) -> NullTracker:
    if rank != 0 or not cfg.tracking.enabled:
        return NullTracker()
    uri = default_tracking_uri(cfg.tracking.uri)
    error = None
    for attempt in range(OPEN_ATTEMPTS):
        if attempt:
            print(f"[tracking] warning: opening MLflow store {uri} failed ({type(error).__name__}); retrying",
                  flush=True)
            time.sleep(2.0 ** (attempt - 1))
        try:
            return MlflowTracker(uri, cfg.tracking.experiment, run_id=run_id,
                                 run_name=cfg.tracking.run_name or os.path.basename(os.path.abspath(cfg.run_dir)),
                                 flush_every=cfg.tracking.flush_every, resume_step=resume_step, run_dir=cfg.run_dir,
                                 max_failures=cfg.tracking.max_failures)
        except Exception as e:  # e.g. two jobs creating one fresh SQLite store race in its schema migration
            error = e
    # the store cannot be opened: train anyway, and keep everything for a replay
    tracker = OfflineTracker(cfg.run_dir, run_id, uri, cfg.tracking.experiment, resume_step)
    first_line = str(error).splitlines()[0][:300] if str(error) else ""
    print(f"[tracking] warning: cannot open MLflow store {uri} ({type(error).__name__}: {first_line}); tracking "
          f"offline, metrics go to {tracker.offline.path}: send them later with python -m pretrain.tracking replay "
          f"{cfg.run_dir}", flush=True)
    return tracker


# ----------------------------------------------------------------------------- offline
class OfflineLog:
    """Appends what could not be sent to RUN_DIR/unsent_metrics.jsonl, one JSON record a line."""

    def __init__(self, run_dir: str, run_id: str | None, uri: str):
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, UNSENT_FILE)
        self.run_id, self.uri = run_id, uri

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"run_id": self.run_id, "uri": self.uri, **record}) + "\n")

    def metrics(self, metrics: list) -> None:
        if metrics:
            self.write({"kind": "metrics", "metrics": [[m.key, m.value, m.timestamp, m.step] for m in metrics]})


class _Metric:
    __slots__ = ("key", "value", "timestamp", "step")

    def __init__(self, key, value, timestamp, step):
        self.key, self.value, self.timestamp, self.step = key, value, timestamp, step


class OfflineTracker(MlflowTracker):
    """A run whose store could not be opened at start: everything goes to the unsent file."""

    def __init__(self, run_dir: str, run_id: str | None, uri: str, experiment: str, resume_step: int | None):
        self._Metric = _Metric
        self.uri, self.run_dir, self.max_failures, self.warn = uri, run_dir, 1, print
        self.run_id = run_id  # None for a new run: replay creates it
        self.resumed, self.flush_every = run_id is not None, 1
        self._buffer, self._last_step, self._steps_buffered = [], None, 0
        self._init_sender()  # no thread: with `offline` set, every call writes to the unsent file
        self.seconds = self.setup_seconds = 0.0
        self.offline = OfflineLog(run_dir, run_id, uri)
        self.offline.write({"kind": "open", "experiment": experiment, "resume_step": resume_step,
                            "run_name": os.path.basename(os.path.abspath(run_dir))})


class ReplayError(Exception):
    """An unsent-metrics file that cannot be replayed as it is (the message says why)."""


def _read_unsent(path: str, warn=print) -> list[dict]:
    """The records of an unsent file. A process killed mid-append leaves its last line torn: that
    line is skipped with a warning; an unreadable line before the last one stops the replay."""
    lines = [line for line in open(path) if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i < len(lines) - 1:
                raise ReplayError(f"{path}: line {i + 1} is not JSON ({e}); only a torn last line is skipped") from None
            warn(f"[tracking] warning: {path}: skipped its torn last line (a process killed while writing it)")
    return records


def replay(run_dir: str, uri: str = "", experiment: str = "", warn=print) -> tuple[str, int]:
    """Sends RUN_DIR/unsent_metrics.jsonl to MLflow (the run it names, or a new run); renames the
    file once sent. Returns (run id, metrics sent).

    A replay that fails part way (the store went away again) can be run again: a progress file
    beside the unsent one keeps the run it sends to and how many records reached it, so the next
    replay goes on from there instead of sending them twice or creating a second run."""
    from mlflow.entities import Metric, Param, RunTag

    path = os.path.join(run_dir, UNSENT_FILE)
    progress_path = path + ".progress"
    if not os.path.isfile(path):
        raise FileNotFoundError(f"nothing to replay: no {path}")
    records = _read_unsent(path, warn)
    progress = json.load(open(progress_path)) if os.path.isfile(progress_path) else {}
    uri = uri or progress.get("uri") or next((r.get("uri") for r in records if r.get("uri")), "") \
        or default_tracking_uri("")
    run_id = progress.get("run_id") or next((r["run_id"] for r in records if r.get("run_id")), None)
    opened = next((r for r in records if r.get("kind") == "open"), {})
    exp_name = experiment or opened.get("experiment") or "hnet-pretrain"
    client, _ = open_client(uri)
    if run_id is None or _existing_run(client, run_id) is None:
        tags = {"replayed_from": path}
        if run_id is not None:
            warn(f"[tracking] warning: MLflow run {run_id} is not in {uri}; replaying into a new run tagged "
                 f"continues_run_id={run_id}")
            tags["continues_run_id"] = run_id
        client, exp_id = open_client(uri, exp_name)
        run_id = client.create_run(exp_id, run_name=opened.get("run_name"), tags=tags).info.run_id
    done = int(progress.get("records_done", 0)) if progress.get("run_id") == run_id else 0

    def note_progress(n: int) -> None:
        with open(progress_path + ".tmp", "w") as f:
            json.dump({"run_id": run_id, "uri": uri, "records_done": n}, f)
        os.replace(progress_path + ".tmp", progress_path)

    note_progress(done)
    existing = set(client.get_run(run_id).data.params)
    sent, status = 0, None
    for n, r in enumerate(records):
        kind = r.get("kind")
        if kind == "status":
            status = r["status"]  # set at the end, whatever was already sent
        if n < done:
            continue
        if kind == "metrics":
            ms = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in r["metrics"]]
            for i in range(0, len(ms), BATCH_LIMIT):
                client.log_batch(run_id, metrics=ms[i:i + BATCH_LIMIT])
            sent += len(ms)
        elif kind == "params":
            items = [Param(k, v) for k, v in r["params"].items() if k not in existing]
            for i in range(0, len(items), 100):
                client.log_batch(run_id, params=items[i:i + 100])
            existing |= {p.key for p in items}
        elif kind == "tags":
            client.log_batch(run_id, tags=[RunTag(k, v) for k, v in r["tags"].items()])
        note_progress(n + 1)
    if status:
        client.set_terminated(run_id, status=status)
    stamp = int(time.time())
    os.replace(path, path + f".replayed.{stamp}")
    os.replace(progress_path, path + f".replayed.{stamp}.progress")
    return run_id, sent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.tracking",
                                 description="Send a run's unsent metrics (RUN_DIR/unsent_metrics.jsonl) to MLflow.")
    sub = ap.add_subparsers(dest="command", required=True)
    rp = sub.add_parser("replay", help="send RUN_DIR/unsent_metrics.jsonl")
    rp.add_argument("run_dir")
    rp.add_argument("--tracking-uri", default="", help="default: the store the run tried to use")
    rp.add_argument("--experiment", default="", help="for a run that never reached the store")
    a = ap.parse_args(argv)
    try:
        run_id, n = replay(a.run_dir, a.tracking_uri, a.experiment)
    except (FileNotFoundError, ReplayError) as e:
        print(f"[tracking] error: {e}", file=sys.stderr)
        return 2
    print(f"[tracking] replayed {n} metric values into MLflow run {run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
