"""Typed experiment configuration: dataclasses read from YAML, overridable with dotted ``key=value``.

One `ExperimentConfig` says everything a training run needs: the model (inline or a public
JSON), the data, the optimizer, the learning-rate schedule, the DeepSpeed file, checkpoints,
evaluation and tracking. An unknown key or a value of the wrong type stops with a
`ConfigError` that names the dotted key.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from pretrain.errors import ConfigError  # noqa: F401  (re-exported: one ConfigError project-wide)


# ----------------------------------------------------------------------------- sections
@dataclass
class ModelSection:
    """The H-Net architecture: `config_path` (a public JSON) and/or inline fields that override it."""

    config_path: str = ""
    arch_layout: list | None = None
    d_model: list[int] | None = None
    d_intermediate: list[int] | None = None
    vocab_size: int | None = None
    ssm_cfg: dict | None = None
    attn_cfg: dict | None = None
    tie_embeddings: bool | None = None
    ratio_targets: list[float] | None = None  # compression target N^s per routing level, outer first
    ratio_alpha: float = 0.03  # weight of the ratio loss (eq. 10)


@dataclass
class DataSection:
    train_index: list[str] = field(default_factory=list)  # index.json files of training shards
    allow_pipe_urls: bool = False  # allow `pipe:CMD` shard URLs in the indexes (a shell command on every rank)
    eval_index: list[str] = field(default_factory=list)  # held-out shards ([] = no evaluation)
    micro_batch_bytes: int = 8192  # row budget of one micro-batch
    step_bytes: int = 65536  # real bytes per optimizer step, all ranks together
    num_workers: int = 0
    seed: int = 0
    on_error: str = "skip"  # "skip" | "fail": what a corrupt document does
    round_to: int = 1
    cost_balance: bool = True  # balance micro-batches by modelled FLOPs instead of bytes
    prefetch: bool = True  # build the next step's batch in a background thread during this step
    eval_step_bytes: int = 0  # 0 = same as step_bytes


@dataclass
class OptimSection:
    lr: float = 6.25e-4  # peak learning rate before per-stage multipliers
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # max global gradient norm (0 = off)


@dataclass
class ScheduleSection:
    name: str = "wsd"  # "wsd" | "cosine"
    warmup_frac: float = 0.1  # fraction of the steps spent in linear warmup
    decay_frac: float = 0.2  # WSD: fraction of the steps spent decaying at the end
    decay_shape: str = "inv_sqrt"  # WSD decay: "inv_sqrt" | "linear"
    min_lr_ratio: float = 0.0  # final lr as a fraction of the peak
    lr_multipliers: list[float] | None = None  # per stage, outer first; None = eq. 11


@dataclass
class TrainSection:
    steps: int = 1000
    engine: str = "deepspeed"  # "deepspeed" | "plain" (one process, no DeepSpeed: baselines)
    ds_config: str = "ds_configs/zero3.json"
    ds_overrides: dict = field(default_factory=dict)  # merged into the DeepSpeed file (not trainer keys)
    precision: str = "fp32"  # "fp32" | "bf16"
    seed: int = 0
    activation_checkpointing: bool = False
    max_bad_steps: int = 3  # consecutive non-finite steps before the run stops
    log_every: int = 10  # steps between console lines (and cost-model updates from the measured compression)
    eval_every: int = 0  # 0 = only at the end (when eval_index is set)
    eval_max_steps: int = 0  # 0 = the whole held-out set
    deterministic: bool = False  # torch.use_deterministic_algorithms: bitwise-repeatable runs and resumes
    #                              on CPU (without it runs with >1 thread differ in the last bits: a
    #                              gather's backward accumulates with parallel atomics). Not on CUDA with
    #                              mamba-ssm: its Triton backward adds with atomics torch does not control
    peak_tflops: float = 0.0  # per device, for perf/mfu; 0 = look up by GPU name
    collective_timeout_s: float = 900.0  # a collective waiting longer (a hung or dead peer) fails the rank
    require_fused: bool = True  # on CUDA, stop at start when a fused kernel (mamba-ssm, causal-conv1d,
    #                             flash-attn) does not import, naming the import error
    lease_stale_s: float = 180.0  # a run-directory lease without a heartbeat for this long may be taken over
    lease_heartbeat_s: float = 5.0  # how often the lease holder (global rank 0) refreshes it


@dataclass
class ParallelSection:
    """How the model is spread beyond data parallelism (world = pipeline_stages x data-parallel size)."""

    pipeline_stages: int = 1  # pipeline ranks along the hierarchy (1 = off; at most num_stages + 1)
    pipeline_levels: list[int] = field(default_factory=list)  # hierarchy levels per pipeline rank, outer
    #                                        first ([] = contiguous groups balanced by the FLOP estimate)
    schedule: str = "v"  # "v" | "1f1b" | "gpipe" (parallel/pipeline/schedule.py)
    micro_batches_in_flight: int = 0  # per pipeline rank (0 = the schedule's default); bounds activation memory
    keep_params_gathered: bool = False  # keep each stage's parameters whole across a step's micro-batches
    #                                     (no ZeRO-3 re-gather per micro-batch; costs full parameters per rank)


@dataclass
class CheckpointSection:
    every: int = 500  # steps between checkpoints (0 = only at the end / on signal)
    keep_last: int = 3
    keep_every: int = 0  # also keep every M-th step forever (0 = off)
    dir: str = ""  # "" = <run_dir>/checkpoints
    requeue: bool = True  # on preemption under SLURM, `scontrol requeue` the job
    auto_reshard: bool = True  # convert to a universal checkpoint when the DP size changed
    reshard_timeout_s: float = 7200.0  # how long other ranks wait for rank 0's conversion (big models: long)


@dataclass
class TrackingSection:
    enabled: bool = True
    uri: str = ""  # "" = $MLFLOW_TRACKING_URI or sqlite:///mlflow.db in the working directory
    experiment: str = "hnet-pretrain"
    run_name: str = ""
    flush_every: int = 50  # steps between log_batch calls (also flushed before checkpoints)
    max_failures: int = 5  # consecutive failed sends (retried with backoff) before tracking goes offline:
    #                        then metrics go to RUN_DIR/unsent_metrics.jsonl (python -m pretrain.tracking replay)


@dataclass
class DebugSection:
    """Fault injection for the tests of the guards; all off by default."""

    nan_at_steps: list[int] = field(default_factory=list)  # make the loss NaN at these steps
    hang_at_step: int = 0  # sleep forever after this step (and its checkpoint): SIGKILL tests
    crash_in_save_at_step: int = 0  # one rank dies in the middle of saving this step
    raise_at_step: int = 0  # rank crash_rank raises an exception at the start of this step
    crash_rank: int = 1
    log_keys: bool = False  # write each step's document keys to train_log.jsonl


@dataclass
class ExperimentConfig:
    run_dir: str = "runs/default"
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    train: TrainSection = field(default_factory=TrainSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    debug: DebugSection = field(default_factory=DebugSection)

    # ------------------------------------------------------------------ resolution
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def model_dict(self) -> dict:
        """The H-Net config as the model's `HNetConfig.from_dict` takes it (public fields + ratio fields)."""
        from pretrain.model.config import model_section_dict

        m = self.model
        return model_section_dict({name: getattr(m, name) for name in MODEL_SECTION_FIELDS})

    def checkpoint_dir(self) -> str:
        return self.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")

    def validate(self) -> None:
        """Checks that need no file system beyond the config itself; names the key that is wrong."""
        _one_of("schedule.name", self.schedule.name, ("wsd", "cosine"))
        _one_of("schedule.decay_shape", self.schedule.decay_shape, ("inv_sqrt", "linear"))
        _one_of("train.precision", self.train.precision, ("fp32", "bf16"))
        _one_of("train.engine", self.train.engine, ("deepspeed", "plain"))
        _one_of("data.on_error", self.data.on_error, ("skip", "fail"))
        if self.train.steps <= 0:
            raise ConfigError(f"train.steps must be > 0, got {self.train.steps}")
        if not 0 <= self.schedule.warmup_frac <= 1 or not 0 <= self.schedule.decay_frac <= 1:
            raise ConfigError("schedule.warmup_frac and schedule.decay_frac must lie in [0, 1]")
        if self.schedule.warmup_frac + self.schedule.decay_frac > 1:
            raise ConfigError("schedule.warmup_frac + schedule.decay_frac must be <= 1")
        if len(self.optim.betas) != 2:
            raise ConfigError(f"optim.betas must have 2 values, got {self.optim.betas}")
        if self.data.micro_batch_bytes <= 1 or self.data.step_bytes <= 0:
            raise ConfigError("data.micro_batch_bytes and data.step_bytes must be positive")
        if not self.data.train_index:
            raise ConfigError("data.train_index is empty: give at least one index.json written by "
                              "`python -m data_pipeline.shard`")
        for key in ("train_index", "eval_index"):
            for path in getattr(self.data, key):
                if not Path(path).is_file():
                    raise ConfigError(f"data.{key}: no such shard index {path!r}")
                _check_index(key, path, self.data.allow_pipe_urls)
        _one_of("parallel.schedule", self.parallel.schedule, ("v", "1f1b", "gpipe"))
        if not 0 < self.train.lease_heartbeat_s * 2 < self.train.lease_stale_s:
            raise ConfigError(f"train.lease_stale_s={self.train.lease_stale_s:g} must exceed twice "
                              f"train.lease_heartbeat_s={self.train.lease_heartbeat_s:g} (and both be positive)")
        if self.parallel.pipeline_stages < 1:
            raise ConfigError(f"parallel.pipeline_stages must be >= 1, got {self.parallel.pipeline_stages}")
        if self.parallel.micro_batches_in_flight < 0:
            raise ConfigError("parallel.micro_batches_in_flight must be >= 0 (0 = the schedule's default)")
        if self.parallel.pipeline_levels and len(self.parallel.pipeline_levels) != self.parallel.pipeline_stages:
            raise ConfigError(f"parallel.pipeline_levels: {self.parallel.pipeline_levels} gives levels for "
                              f"{len(self.parallel.pipeline_levels)} pipeline ranks, parallel.pipeline_stages is "
                              f"{self.parallel.pipeline_stages}")
        if self.parallel.pipeline_stages > 1 and self.train.engine != "deepspeed":
            raise ConfigError("parallel.pipeline_stages > 1 needs train.engine=deepspeed (one ZeRO-3 engine per stage)")
        if self.checkpoint.keep_last < 1:
            raise ConfigError("checkpoint.keep_last must be >= 1")
        if self.checkpoint.reshard_timeout_s <= 0:
            raise ConfigError(f"checkpoint.reshard_timeout_s must be > 0, got {self.checkpoint.reshard_timeout_s}")
        self._validate_ranges()

    def _validate_ranges(self) -> None:
        """Numbers outside their meaning stop at start: a step cadence of 0 would divide by zero
        hours in, a negative one would checkpoint every step, a negative min_lr_ratio would ascend
        the loss for the whole decay."""
        o, s, t, d, c, tr = self.optim, self.schedule, self.train, self.data, self.checkpoint, self.tracking
        _at_least("optim.lr", o.lr, 0, strict=True)
        for i, beta in enumerate(o.betas):
            if not 0 <= beta < 1:
                raise ConfigError(f"optim.betas[{i}] must lie in [0, 1), got {beta}")
        _at_least("optim.eps", o.eps, 0)
        _at_least("optim.weight_decay", o.weight_decay, 0)
        _at_least("optim.grad_clip", o.grad_clip, 0, meaning="0 = off")
        if not 0 <= s.min_lr_ratio <= 1:
            raise ConfigError(f"schedule.min_lr_ratio must lie in [0, 1] (the final lr as a fraction of the "
                              f"peak), got {s.min_lr_ratio}")
        for i, m in enumerate(s.lr_multipliers or []):
            _at_least(f"schedule.lr_multipliers[{i}]", m, 0, strict=True)
        _at_least("train.log_every", t.log_every, 1)
        _at_least("train.eval_every", t.eval_every, 0, meaning="0 = only at the end")
        _at_least("train.eval_max_steps", t.eval_max_steps, 0, meaning="0 = the whole held-out set")
        _at_least("train.max_bad_steps", t.max_bad_steps, 1)
        _at_least("train.peak_tflops", t.peak_tflops, 0, meaning="0 = look up by GPU name")
        _at_least("train.collective_timeout_s", t.collective_timeout_s, 0, strict=True)
        _at_least("data.num_workers", d.num_workers, 0)
        _at_least("data.round_to", d.round_to, 1)
        if d.micro_batch_bytes % d.round_to:
            raise ConfigError(f"data.micro_batch_bytes ({d.micro_batch_bytes}) must be a multiple of "
                              f"data.round_to ({d.round_to})")
        _at_least("data.eval_step_bytes", d.eval_step_bytes, 0, meaning="0 = same as data.step_bytes")
        _at_least("checkpoint.every", c.every, 0, meaning="0 = only at the end and on a signal")
        _at_least("checkpoint.keep_every", c.keep_every, 0, meaning="0 = off")
        _at_least("tracking.flush_every", tr.flush_every, 1)
        _at_least("tracking.max_failures", tr.max_failures, 1)

    def hash(self) -> str:
        """Stable hash of the resolved config (the model part decides checkpoint compatibility)."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


MODEL_SECTION_FIELDS = ("config_path", "arch_layout", "d_model", "d_intermediate", "vocab_size", "ssm_cfg", "attn_cfg",
                        "tie_embeddings", "ratio_targets", "ratio_alpha")


def _check_index(key: str, path: str, allow_pipe_urls: bool) -> None:
    """A readable shard index, without pipe: URLs unless they are allowed: refused at start."""
    from data_pipeline.index import DataError, load_indexes

    try:
        load_indexes([path], allow_pipe_urls)
    except DataError as e:
        raise ConfigError(f"data.{key}: {e}") from None


def _at_least(key: str, value: float, low: float, strict: bool = False, meaning: str = "") -> None:
    if not (value > low if strict else value >= low):  # also refuses NaN
        note = f" ({meaning})" if meaning else ""
        raise ConfigError(f"{key} must be {'>' if strict else '>='} {low:g}{note}, got {value}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}")


# ----------------------------------------------------------------------------- building
def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Returns `value` converted to `tp` where that is lossless (int -> float), else raises naming `key`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(key, value, arg)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is list or tp is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_check_type(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        # YAML 1.1 (PyYAML) reads `1e-3` without a dot as a string: a number written so is a number
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        # YAML reads `run_dir=2024-06-01` or `run_name=42` as a date or an int: for a string field
        # those read back unchanged as text
        if isinstance(value, (datetime.date, int)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r} (known under {prefix or 'top level'}: "
                              f"{sorted(names)})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, f"{dotted}.")
        else:
            kwargs[key] = _check_type(dotted, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.get(p)
        if child is None:
            child = node[p] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_override(arg: str) -> tuple[str, Any]:
    """'train.steps=30' -> ('train.steps', 30); the value is read as YAML (numbers, lists, bools)."""
    if "=" not in arg:
        raise ConfigError(f"override {arg!r}: expected dotted.key=value")
    key, raw = arg.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key!r}: cannot parse value {raw!r}: {e}") from None
    return key.strip(), value


def load_config(path: str | None = None, overrides: list[str] | None = None, validate: bool = True) -> ExperimentConfig:
    """Reads a YAML file (or starts from defaults) and applies dotted overrides.

    Section-level keys of a dataclass section are checked; free-form mappings (`ds_overrides`,
    inline `ssm_cfg` / `attn_cfg`) are merged key by key.
    """
    tree: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: no such file {path!r}")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    for arg in overrides or []:
        key, value = parse_override(arg)
        _set_dotted(tree, key, value)
    cfg = _build(ExperimentConfig, tree)
    if validate:
        cfg.validate()
    return cfg


def config_from_dict(tree: dict) -> ExperimentConfig:
    return _build(ExperimentConfig, tree)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values (MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def dump_yaml(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
