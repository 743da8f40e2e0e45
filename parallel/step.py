"""How one optimizer step's forward and backward run over the engines.

The training loop (pretrain/train.py) only sees a `StepExecutor`: `batches(loader)`,
`train_step(step_batch)`, `eval_step(step_batch)`, `save` / `load` (the checkpoint manager's
storage), `param_groups`. Two executors exist:

- `ZeroStep`: one DeepSpeed engine (ZeRO-1/2/3) over all ranks, i.e. data parallel.
- `PlainStep`: one process, plain PyTorch AdamW, no DeepSpeed (baselines, equivalence tests).

A pipeline schedule over per-stage ZeRO-3 engines is a third executor with the same interface,
so the loop, checkpointing, evaluation and tracking stay as they are.

Token weighting: every real target byte of the global step weighs the same. DeepSpeed's
`engine.backward` divides the loss by the gradient-accumulation count and its reduction averages
gradients over the data-parallel ranks, so left alone every micro-batch would weigh the same
whatever its number of targets. Instead micro-batch i's summed cross-entropy is scaled by
DP / global_targets before backward; DeepSpeed then averages gradients over the DP ranks (divide
by DP) and, with its gradient accumulation count fixed at 1 and the accumulation boundary
driven here (`set_gradient_accumulation_boundary`, `scale_wrt_gas=False`), divides by 1. The
gradient is therefore d(sum over all targets of CE / global_targets), whatever rank or
micro-batch a byte landed in. The ratio loss (per micro-batch, alpha-weighted) is averaged over
all micro-batches of the step: scaled by 1 / n_micro before the same DP average.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from parallel.distributed import all_reduce_sum


@dataclass
class StepResult:
    """Global (all-rank) figures of one optimizer step."""

    loss_sum: float  # summed cross-entropy over all target bytes, nats
    n_targets: int
    n_bytes: int
    ratio_loss: float  # alpha-weighted ratio loss, mean over micro-batches
    compression: list[float]  # bytes per chunk at each stage (outer first), byte-weighted
    boundary_fraction: list[float]  # F per stage, byte-weighted
    grad_norm: float
    skipped: bool  # non-finite loss or gradient: no parameter update
    n_micro: int
    bad_keys: list[str] = field(default_factory=list)  # this rank's keys of the micro-batches that went bad
    extra_metrics: dict[str, float] = field(default_factory=dict)  # executor-specific (e.g. perf/bubble/rank{k})

    @property
    def loss(self) -> float:
        """Mean cross-entropy per target byte (nats)."""
        return self.loss_sum / max(1, self.n_targets)

    @property
    def bpb(self) -> float:
        return self.loss / math.log(2)


def stage_stats(out) -> tuple[list[float], list[float]]:
    """Bytes per chunk and boundary fraction per stage for one micro-batch (outer first)."""
    bpc, frac = [], []
    prod = 1.0
    for st in out.stages:
        prod *= float(st.compression_ratio)
        bpc.append(prod)
        frac.append(float(st.F))
    return bpc, frac


class _Accumulator:
    """Local sums of one step; reduced over ranks in one all_reduce.

    The figures that come from the device (loss sums, ratio losses, compression ratios, F, and
    whether each micro-batch's terms were finite) stay on the device as fp64 tensors across the
    micro-batches, and `read` brings them to the host in one read per step. A host read of a
    device value waits for all the work queued before it (PyTorch's CUDA semantics notes on
    asynchronous execution), so reading them per micro-batch would drain the queue several times
    per micro-batch. fp64 on the device: the same sums, in the same order, as Python floats.
    Host counts (targets, bytes, micro-batches) are Python ints from the batch.
    """

    def __init__(self, n_stages: int):
        self.n_stages = n_stages
        self.n_targets = 0
        self.n_bytes = 0
        self.n_micro = 0
        self._sums: list = [0.0] * (2 + 2 * n_stages)  # loss_sum, ratio, bytes-weighted bpc and F per stage
        self._checks: list[tuple[torch.Tensor, list[str]]] = []  # finiteness of a micro-batch's terms, its keys
        self._values: list[float] | None = None  # the sums on the host, after `read`
        self.bad = 0.0
        self.bad_keys: list[str] = []

    def _add(self, i: int, value) -> None:
        self._sums[i] = self._sums[i] + value
        self._values = None

    def _finite(self, terms: list, keys) -> list:
        """The terms (fp64, detached) where all of them are finite, else zeros; the finiteness is
        read with the sums (the micro-batch's keys are reported if it was not)."""
        terms = [t.detach().double().reshape(()) for t in terms]
        ok = torch.stack([torch.isfinite(t) for t in terms]).all()
        self._checks.append((ok, list(keys)))
        return [torch.where(ok, t, torch.zeros_like(t)) for t in terms]

    def _count(self, mb) -> None:
        self.n_targets += int(mb.n_targets)
        self.n_bytes += int(mb.n_bytes)
        self.n_micro += 1

    def add(self, out, mb, loss_sum: torch.Tensor, ratio: torch.Tensor) -> None:
        loss_sum, ratio = self._finite([loss_sum, ratio], mb.keys)
        self._add(0, loss_sum)
        self._add(1, ratio)
        self._count(mb)
        if out is not None and out.stages:
            self.add_levels(0, out.stages[:self.n_stages], 1.0, float(mb.n_bytes))

    def add_loss(self, mb, loss_sum: torch.Tensor) -> None:
        """A micro-batch's summed cross-entropy (on the rank that computes the loss)."""
        (loss_sum,) = self._finite([loss_sum], mb.keys)
        self._add(0, loss_sum)
        self._count(mb)

    def add_ratio(self, ratio: torch.Tensor, keys=()) -> None:
        (ratio,) = self._finite([ratio], keys)
        self._add(1, ratio)

    def add_levels(self, first_stage: int, stats, bytes_per_chunk_in, n_bytes):
        """Statistics of routing stages first_stage.. of one micro-batch of `n_bytes` real bytes,
        whose bytes per chunk entering first_stage are `bytes_per_chunk_in` (a pipeline rank sees
        only its own levels; both a float or a 0-dim tensor). Returns the bytes per chunk after
        the last of them (a tensor: nothing is read here)."""
        bpc = bytes_per_chunk_in
        for s, st in enumerate(stats, start=first_stage):
            bpc = bpc * st.compression_ratio.detach().double()
            self._add(2 + s, bpc * n_bytes)
            self._add(2 + self.n_stages + s, st.F.detach().double() * n_bytes)
        return bpc

    def read(self, *extra) -> list[float]:
        """The step's one host read: every device sum and finiteness flag, and `extra` scalars
        (tensors, floats or None, e.g. the gradient norm) in the same read; returns the extras as
        floats (None: nan). Sets `bad` and `bad_keys`."""
        entries = self._sums + [ok for ok, _ in self._checks] + list(extra)
        tensors = [e for e in entries if torch.is_tensor(e)]
        read = iter(torch.stack([t.detach().double().reshape(()) for t in tensors]).tolist() if tensors else [])
        values = [next(read) if torch.is_tensor(e) else (float("nan") if e is None else float(e)) for e in entries]
        n_sums, n_checks = len(self._sums), len(self._checks)
        self._values = values[:n_sums]
        flags = values[n_sums:n_sums + n_checks]
        self.bad_keys = [k for f, (_, keys) in zip(flags, self._checks) if not f for k in keys]
        self.bad = 1.0 if not all(flags) else 0.0
        return values[n_sums + n_checks:]

    def reduce(self, grad_norm: float, skipped_local: bool = False) -> StepResult:
        if self._values is None:
            self.read()
        s = self.n_stages
        vec = [self._values[0], self.n_targets, self.n_bytes, self._values[1], self.n_micro,
               self.bad + float(skipped_local)]
        vec += self._values[2:]
        tot = all_reduce_sum(vec)
        loss_sum, n_t, n_b, ratio, n_micro, bad = tot[:6]
        bpc = [v / max(1.0, n_b) for v in tot[6:6 + s]]
        frac = [v / max(1.0, n_b) for v in tot[6 + s:6 + 2 * s]]
        skipped = bad > 0 or not math.isfinite(grad_norm)
        return StepResult(loss_sum=loss_sum, n_targets=int(n_t), n_bytes=int(n_b), ratio_loss=ratio / max(1.0, n_micro),
                          compression=bpc, boundary_fraction=frac, grad_norm=grad_norm, skipped=skipped,
                          n_micro=int(n_micro), bad_keys=self.bad_keys)


def _to(mb, device):
    """ids and labels to the device; cu_seqlens stays on the host, where the packer built it: the
    model takes level 0's documents from it without reading the device (pretrain.model.sequence)."""
    return (mb.input_ids.to(device, non_blocking=True), mb.labels.to(device, non_blocking=True), mb.cu_seqlens)


def _n_real(mb) -> int | None:
    """Real positions of a row padded at its end (row rounding), so routing statistics skip the padding."""
    n = int(mb.n_bytes)
    return n if n < mb.input_ids.shape[-1] else None


def _scalar(x) -> float:
    if x is None:
        return 0.0
    return float(x.detach().float().item()) if torch.is_tensor(x) else float(x)


class StepExecutor:
    """Interface the loop drives. `n_stages` = routing levels of the model."""

    dp_rank: int = 0
    dp_world: int = 1
    n_stages: int = 1
    before_step = None  # optional hook(executor), called after the backwards, before the optimizer step

    # which data this rank reads: its position among the ranks that read data, and their group
    # (None: the world); a pipeline's deeper ranks read none
    @property
    def data_rank(self) -> int:
        return self.dp_rank

    @property
    def data_world(self) -> int:
        return self.dp_world

    data_group = None
    reads_data = True

    @property
    def module(self) -> torch.nn.Module:  # the (possibly ZeRO-wrapped) H-Net
        raise NotImplementedError

    @property
    def param_groups(self) -> list[dict]:
        raise NotImplementedError

    def batches(self, loader):
        """The step batches this rank trains on (an executor whose ranks do not all read data
        hands the others what they need to know)."""
        return iter(loader)

    def train_step(self, batch, inject_nan: bool = False) -> StepResult:
        raise NotImplementedError

    @torch.no_grad()
    def eval_forward(self, mb):
        """One forward without gradients; returns the model output."""
        ids, labels, cu = _to(mb, self.device)
        return self._forward(ids, cu, labels, _n_real(mb))

    def eval_step(self, batch) -> list:
        """(micro-batch, model output) for the micro-batches whose loss this rank computes."""
        return [(mb, self.eval_forward(mb)) for mb in batch.micro_batches]

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        raise NotImplementedError

    def load(self, ckpt_dir: str, tag: str, universal: bool = False) -> dict:
        raise NotImplementedError


class EngineExecutor(StepExecutor):
    """An executor that drives one DeepSpeed engine (`self.engine`)."""

    @property
    def module(self):
        return self.engine.module

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups


class ZeroStep(EngineExecutor):
    """One DeepSpeed engine over all data-parallel ranks."""

    def __init__(self, engine, n_stages: int, dp_rank: int, dp_world: int):
        self.engine = engine
        self.n_stages = n_stages
        self.dp_rank = dp_rank
        self.dp_world = dp_world
        self.device = engine.device

    def _forward(self, ids, cu, labels, n_real=None):
        return self.engine(ids, cu_seqlens=cu, labels=labels, n_real=n_real)

    def train_step(self, batch, inject_nan: bool = False) -> StepResult:
        mbs = batch.micro_batches
        n = len(mbs)
        weight = self.dp_world / max(1, int(batch.global_targets))
        acc = _Accumulator(self.n_stages)
        self.engine.train()
        for i, mb in enumerate(mbs):
            # The boundary is ours: reduce-scatter + optimizer step only after the last micro-batch.
            self.engine.set_gradient_accumulation_boundary(i == n - 1)
            ids, labels, cu = _to(mb, self.device)
            out = self._forward(ids, cu, labels, _n_real(mb))
            loss_sum = out.loss_sum
            if inject_nan:
                loss_sum = loss_sum * float("nan")
            ratio = out.ratio_loss if out.ratio_loss is not None else loss_sum.new_zeros(())
            objective = loss_sum * weight + ratio / n
            # scale_wrt_gas=False: DeepSpeed's 1/GAS must not apply on top of our weighting.
            self.engine.backward(objective, scale_wrt_gas=False)
            acc.add(out, mb, loss_sum, ratio)
        if self.before_step is not None:
            self.before_step(self)
        self.engine.step()  # ZeRO skips the update itself when the gradient norm is inf/nan
        (grad_norm,) = acc.read(self.engine.get_global_grad_norm())  # with the statistics: one read
        return acc.reduce(grad_norm)

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        # save_latest=False: DeepSpeed's rank 0 would write `latest` as soon as *it* is done, before
        # the other ranks finished; the checkpoint manager moves `latest` after a barrier instead.
        self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: str, tag: str, universal: bool = False) -> dict:
        cfg = self.engine._config
        before = cfg.load_universal_checkpoint
        # A universal checkpoint is loaded with load_universal for this one load only; saves after
        # it are ordinary ZeRO checkpoints again.
        cfg.load_universal_checkpoint = universal
        try:
            path, client = self.engine.load_checkpoint(ckpt_dir, tag=tag, load_optimizer_states=True,
                                                       load_lr_scheduler_states=False)
        finally:
            cfg.load_universal_checkpoint = before
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
        return client or {}


class PlainStep(StepExecutor):
    """One process, plain PyTorch: the reference the ZeRO executor must agree with."""

    PLAIN_FILE = "plain_states.pt"

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, n_stages: int,
                 grad_clip: float, device: torch.device | str = "cpu", autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.optimizer = optimizer
        self.n_stages = n_stages
        self.grad_clip = grad_clip
        self.device = torch.device(device)
        # train.precision=bf16: the forward under torch autocast, parameters and optimizer in fp32,
        # the same mixed precision as the DeepSpeed executor's torch_autocast
        self.autocast_dtype = autocast_dtype

    @property
    def module(self):
        return self.model

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _forward(self, ids, cu, labels, n_real=None):
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return self.model(ids, cu_seqlens=cu, labels=labels, n_real=n_real)

    def train_step(self, batch, inject_nan: bool = False) -> StepResult:
        mbs = batch.micro_batches
        n = len(mbs)
        weight = 1.0 / max(1, int(batch.global_targets))
        acc = _Accumulator(self.n_stages)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        for mb in mbs:
            ids, labels, cu = _to(mb, self.device)
            out = self._forward(ids, cu, labels, _n_real(mb))
            loss_sum = out.loss_sum * float("nan") if inject_nan else out.loss_sum
            ratio = out.ratio_loss if out.ratio_loss is not None else loss_sum.new_zeros(())
            (loss_sum * weight + ratio / n).backward()
            acc.add(out, mb, loss_sum, ratio)
        if self.before_step is not None:
            self.before_step(self)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.grad_clip > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            gn = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        # The step's one read (the statistics and the gradient norm together): whether to update
        # is decided on the host.
        (grad_norm,) = acc.read(gn)
        bad = acc.bad > 0 or not math.isfinite(grad_norm)
        if not bad:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return acc.reduce(grad_norm, skipped_local=bad)

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        d = os.path.join(ckpt_dir, tag)
        os.makedirs(d, exist_ok=True)
        tmp = os.path.join(d, self.PLAIN_FILE + ".tmp")
        torch.save({"module": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                    "client_state": client_state}, tmp)
        os.replace(tmp, os.path.join(d, self.PLAIN_FILE))

    def load(self, ckpt_dir: str, tag: str, universal: bool = False) -> dict:
        path = os.path.join(ckpt_dir, tag, self.PLAIN_FILE)
        if not os.path.isfile(path):
            raise RuntimeError(f"{path} not found: a plain-engine run resumes only from a plain-engine checkpoint")
        state = torch.load(path, map_location="cpu", weights_only=False)
        self.model.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client_state"]
