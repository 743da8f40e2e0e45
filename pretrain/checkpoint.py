"""Checkpoint directory management: tags, the project-owned `latest`, retention, resume lookup.

Layout under the checkpoint directory::

    step00000120/            engine files (ZeRO shards, one set per rank) + meta.json + config.yaml + COMPLETE
    step00000120_universal/  only after `python -m pretrain.reshard` (DeepSpeed universal format)
    latest                   the tag of the newest complete checkpoint

`latest` moves only after every rank finished writing: the engine save runs on all ranks
(DeepSpeed's own `latest` is disabled), then a barrier, then rank 0 writes COMPLETE and replaces
`latest` atomically (write a temporary file, fsync, rename). A crash anywhere before the rename
leaves `latest` on the previous checkpoint, which stays loadable.

What a checkpoint holds is registered once (torchtitan's checkpoint manager and Lingua's
train state are the models): `register_storage(executor)` names what writes the engine shards
(`save(root, tag, client_state)` / `load(root, tag, universal) -> client_state`), and
`register(name, obj)` adds any object with `state_dict()` / `load_state_dict()` (the loop's
counters, the data loader, the schedule, the RNG states, the MLflow run id). `save_registered`
puts every registered state into the engine's client state; `restore` loads them all back, in
registration order, and refuses a checkpoint that lacks one.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

from parallel.distributed import barrier
from pretrain.errors import TrainingError

TAG_RE = re.compile(r"^step(\d{8})$")
LATEST = "latest"
COMPLETE = "COMPLETE"
META = "meta.json"
CLIENT_FORMAT = "hnet-trainer/2"  # client state = {"format", "states": {registered name: state}, ...}


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def step_of(tag: str) -> int:
    m = TAG_RE.match(tag)
    if not m:
        raise ValueError(f"not a checkpoint tag: {tag!r}")
    return int(m.group(1))


def atomic_write(path: str, text: str) -> None:
    d = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_" + os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # fsync the directory so the rename itself survives a crash.
    dfd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def model_shape(model_dict: dict) -> dict:
    """The part of a model config that decides parameter shapes (ratio targets and alpha may change)."""
    return {k: v for k, v in model_dict.items() if k not in ("ratio_targets", "ratio_alpha")}


def describe_difference(have: dict, want: dict, prefix: str = "model.") -> str:
    diffs = []
    for k in sorted(set(have) | set(want)):
        if have.get(k) != want.get(k):
            diffs.append(f"{prefix}{k}: checkpoint {have.get(k)!r} vs requested {want.get(k)!r}")
    return "; ".join(diffs)


def _legacy_states(client: dict) -> dict:
    """The registered states of a checkpoint written before registration existed (hand-built
    client-state keys), under the names the trainer registers."""
    return {"train": {k: client.get(k, 0) for k in ("step", "bytes_seen", "bad_steps_in_a_row")},
            "data": client["data_state"], "schedule": client["schedule"],
            "rng": {"world_size": client["world_size"], "ranks": client["rng"]},
            "tracking": {"run_id": client.get("mlflow_run_id")}}


class CheckpointManager:
    def __init__(self, root: str, keep_last: int = 3, keep_every: int = 0, rank: int = 0):
        self.root = root
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.rank = rank
        self.storage = None
        self._stateful: dict[str, object] = {}

    # ------------------------------------------------------------------ registration
    def register_storage(self, storage) -> None:
        """What writes and reads the engine files (an executor: `save`, `load`)."""
        self.storage = storage

    def register(self, name: str, obj) -> None:
        """`obj` (state_dict / load_state_dict) is saved in every checkpoint and restored on resume."""
        if name in self._stateful:
            raise ValueError(f"checkpoint state {name!r} is registered twice")
        self._stateful[name] = obj

    def save_registered(self, step: int, meta: dict, config_yaml: str, extra: dict | None = None,
                        crash_hook=None) -> str:
        """Saves the engine files and every registered state (on every rank). Returns the tag."""
        client = {"format": CLIENT_FORMAT, "states": {n: o.state_dict() for n, o in self._stateful.items()},
                  **(extra or {})}
        return self.save(self.storage, step, client, meta, config_yaml, crash_hook=crash_hook)

    def restore(self, tag: str, universal: bool = False) -> None:
        """Loads the engine files of `tag` and every registered state, in registration order."""
        client = self.storage.load(self.root, tag, universal=universal)
        states = client["states"] if client.get("format") == CLIENT_FORMAT else _legacy_states(client)
        missing = [n for n in self._stateful if n not in states]
        if missing:
            raise TrainingError(f"checkpoint {self.root}/{tag} holds no saved state for {missing}: it was written "
                                f"by a trainer that did not have them; resume it with that version")
        for name, obj in self._stateful.items():
            try:
                obj.load_state_dict(states[name])
            except ValueError as e:  # e.g. the loader's: another shard list or data.seed
                raise TrainingError(f"refusing to resume from {self.root}/{tag}: its saved {name!r} state does "
                                    f"not fit this run: {e}") from None

    def resume_point(self, model_dict: dict, engine: str, pipeline: dict | None = None) -> tuple[str | None, dict | None]:
        """The tag to resume from and its meta (None, None for a fresh run). Raises TrainingError
        for a checkpoint of another model shape, engine or pipeline layout: nothing is loaded or
        written then."""
        tag = self.latest_tag()
        if not tag:
            return None, None
        meta = self.read_meta(tag)
        want, have = model_shape(model_dict), model_shape(meta["model"])
        if want != have:
            raise TrainingError(
                f"refusing to resume: checkpoint {self.root}/{tag} was trained with another model "
                f"({describe_difference(have, want)}). Use another run_dir or the checkpoint's model config.")
        if meta.get("engine", "deepspeed") != engine:
            raise TrainingError(f"refusing to resume: checkpoint {tag} was written by train.engine="
                                f"{meta.get('engine')!r}, this run uses {engine!r}")
        if meta.get("pipeline") != pipeline:
            def show(pl):
                return "no pipeline" if not pl else f"{pl['stages']} pipeline stages with levels {pl['levels']}"
            raise TrainingError(f"refusing to resume: checkpoint {self.root}/{tag} was written with "
                                f"{show(meta.get('pipeline'))}, this run has {show(pipeline)}; resume with the same "
                                f"parallel.pipeline_stages / pipeline_levels (the data-parallel size may change), "
                                f"or export it (python -m pretrain.export) and start a new run from the weights")
        return tag, meta

    # ------------------------------------------------------------------ queries
    def latest_tag(self) -> str | None:
        path = os.path.join(self.root, LATEST)
        if not os.path.isfile(path):
            return None
        tag = open(path).read().strip()
        return tag or None

    def changed_settings(self, tag: str, config: dict) -> dict:
        """{key: (checkpoint's value, this run's)} for every setting that differs from the
        checkpoint's config (a resumed run may change one on purpose, train.steps or optim.lr, or by
        a forgotten override, train.precision: neither may be silent)."""
        import yaml

        from pretrain.config import flatten

        path = os.path.join(self.root, tag, "config.yaml")
        if not os.path.isfile(path):
            return {}
        with open(path) as f:
            old = flatten(yaml.safe_load(f) or {})
        new = flatten(config)
        return {k: (old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)}

    def read_meta(self, tag: str) -> dict:
        """The tag's meta.json; TrainingError, naming the file and the complete checkpoints there
        are, when it is missing or unreadable (a deleted or damaged checkpoint, a hand-edited `latest`)."""
        path = os.path.join(self.root, tag, META)
        if not os.path.isdir(os.path.join(self.root, tag)):
            problem = f"{self.root}/{LATEST} names {tag}, which is not there"
        elif not os.path.isfile(path):
            problem = f"checkpoint {self.root}/{tag} has no {META}: not written by this trainer, or damaged"
        else:
            try:
                with open(path) as f:
                    return json.load(f)
            except (OSError, ValueError) as e:
                problem = f"cannot read {path} ({type(e).__name__}: {e})"
        complete = [t for t in self.complete_tags() if t != tag]
        choice = (f"the complete checkpoints here are {complete}: write the tag to resume from into "
                  f"{self.root}/{LATEST}" if complete else "there is no other complete checkpoint here")
        raise TrainingError(f"{problem}; {choice}, or start afresh in another run_dir")

    def complete_tags(self) -> list[str]:
        if not os.path.isdir(self.root):
            return []
        tags = [t for t in os.listdir(self.root)
                if TAG_RE.match(t) and os.path.isfile(os.path.join(self.root, t, COMPLETE))]
        return sorted(tags, key=step_of)

    # ------------------------------------------------------------------ saving
    def save(self, executor, step: int, client_state: dict, meta: dict, config_yaml: str,
             crash_hook=None) -> str:
        """Runs on every rank. Returns the tag. `crash_hook(phase)` is for fault-injection tests."""
        tag = tag_for(step)
        tag_dir = os.path.join(self.root, tag)
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            # A leftover of a crashed save of this same step (possibly by more ranks, before a
            # reshard) must not be mistaken for complete nor leave extra shard files behind.
            if os.path.isdir(tag_dir) and tag != self.latest_tag():
                shutil.rmtree(tag_dir)
            elif os.path.exists(os.path.join(tag_dir, COMPLETE)):
                os.unlink(os.path.join(tag_dir, COMPLETE))
        barrier()
        if crash_hook:
            crash_hook("before_engine_save")
        executor.save(self.root, tag, client_state)
        if crash_hook:
            crash_hook("after_engine_save")
        barrier()  # every rank finished writing its shard
        if self.rank == 0:
            os.makedirs(tag_dir, exist_ok=True)
            atomic_write(os.path.join(tag_dir, META), json.dumps(meta, indent=1, sort_keys=True))
            atomic_write(os.path.join(tag_dir, "config.yaml"), config_yaml)
            atomic_write(os.path.join(tag_dir, COMPLETE), "")
            atomic_write(os.path.join(self.root, LATEST), tag)
            self.prune()
        barrier()
        return tag

    def prune(self) -> list[str]:
        """Keeps the newest `keep_last` complete checkpoints and every `keep_every`-th step; removes
        the rest and any incomplete tag directory older than `latest` (debris of a crashed save)."""
        latest = self.latest_tag()
        complete = self.complete_tags()
        keep = set(complete[-self.keep_last:])
        if latest:
            keep.add(latest)
        if self.keep_every > 0:
            keep.update(t for t in complete if step_of(t) % self.keep_every == 0)
        removed = []
        latest_step = step_of(latest) if latest else -1
        for name in os.listdir(self.root):
            base = name[: -len("_universal")] if name.endswith("_universal") else name
            if not TAG_RE.match(base):
                continue
            path = os.path.join(self.root, name)
            is_complete = os.path.isfile(os.path.join(self.root, base, COMPLETE))
            stale_partial = not is_complete and step_of(base) < latest_step
            if (is_complete and base not in keep) or stale_partial:
                if name == base and is_complete:  # unmark first: a crash mid-delete leaves no "complete" half
                    os.unlink(os.path.join(path, COMPLETE))
                shutil.rmtree(path, ignore_errors=True)
                removed.append(name)
        return removed
