"""Host-device synchronisations of one training micro-batch, counted on CPU.

On CUDA, every read of a device value by the host waits for the device to finish all the work
queued before it (PyTorch's CUDA semantics notes: `.item()`, `.tolist()`, `int()`/`float()`/
`bool()` of a tensor, `.cpu()`; and ops whose output size depends on the data: `nonzero`,
boolean-mask indexing, `repeat_interleave` without `output_size`). Each such wait empties the
launch queue, so the device idles while the host catches up. On CPU nothing waits, so this test
counts the *calls* that would wait on a device, by wrapping them, while PlainStep trains a
1-stage and a 2-stage model (the model code is the same under DeepSpeed).

What is allowed per micro-batch: one read per hierarchy level (the chunk count and the next
level's document boundaries, which size the next level's tensors: inherent to dynamic chunking)
plus `CONSTANT`. Reads of the micro-batch's own host tensors (cu_seqlens as the packer built it)
are no synchronisation and are not counted. Per step: the gradient norm and the statistics, read
once (`_Accumulator.reduce`).
"""
from __future__ import annotations

import contextlib
import traceback

import pytest
import torch

from data_pipeline.packer import Piece, pack_row
from parallel.step import PlainStep

from .conftest import tiny_model

CONSTANT = 0  # reads per micro-batch beyond one per level (none are needed)
PER_STEP = 1  # per step: the statistics and the gradient norm, read together (`_Accumulator.read`)

_READS = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__", "nonzero", "cpu", "numpy")


def _is_bool_tensor(x) -> bool:
    return torch.is_tensor(x) and x.dtype == torch.bool


def _syncing_index(idx) -> bool:
    """A boolean mask, or a slice bound that is a tensor (both read the device)."""
    parts = idx if isinstance(idx, tuple) else (idx,)
    for p in parts:
        if _is_bool_tensor(p):
            return True
        if isinstance(p, slice) and any(torch.is_tensor(b) for b in (p.start, p.stop, p.step)):
            return True
    return False


class HostReads:
    """Patches the reading calls of torch.Tensor (and the data-dependent-size ops) to count them;
    `host` holds tensors that live on the host in production (reads of them are not counted)."""

    def __init__(self):
        self.sites: list[str] = []
        self.host: set[int] = set()
        self._depth = 0

    def _record(self, what: str) -> None:
        frame = next(f for f in reversed(traceback.extract_stack()) if f.filename != __file__)
        if "/torch/optim/" in frame.filename:
            return  # the optimizers' step counters are host tensors (capturable=False), once per step
        self.sites.append(f"{what} at {frame.filename.split('/work/main/')[-1]}:{frame.lineno}")

    def _wrap(self, owner, name: str, syncs):
        orig = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if self._depth == 0 and syncs(*args, **kwargs):
                self._record(name)
            self._depth += 1  # a read inside a counted read is the same wait
            try:
                return orig(*args, **kwargs)
            finally:
                self._depth -= 1

        return orig, wrapper

    def _rules(self):
        device_read = lambda t, *a, **k: id(t) not in self.host  # noqa: E731
        rules = [(torch.Tensor, name, device_read) for name in _READS]
        rules.append((torch, "nonzero", lambda *a, **k: True))
        rules.append((torch, "masked_select", lambda *a, **k: True))
        no_size = lambda *a, **k: "output_size" not in k and not isinstance(a[1] if len(a) > 1 else k.get("repeats"), int)  # noqa: E731
        rules.append((torch, "repeat_interleave", lambda x, *a, **k: bool(a or "repeats" in k) and no_size(x, *a, **k)))
        rules.append((torch.Tensor, "repeat_interleave", no_size))
        rules.append((torch.Tensor, "__getitem__", lambda t, idx: _syncing_index(idx)))
        rules.append((torch.Tensor, "__setitem__", lambda t, idx, v: _syncing_index(idx)))
        return rules

    @contextlib.contextmanager
    def counting(self):
        saved = []
        try:
            for owner, name, syncs in self._rules():
                orig, wrapper = self._wrap(owner, name, syncs)
                saved.append((owner, name, orig))
                setattr(owner, name, wrapper)
            yield self
        finally:
            for owner, name, orig in reversed(saved):
                setattr(owner, name, orig)


def _micro_batch(seed: int, n_docs: int = 3, round_to: int = 64):
    g = torch.Generator().manual_seed(seed)
    pieces = [Piece(f"s:{seed}-{i}", bytes(torch.randint(0, 254, (40 + 17 * i,), generator=g).tolist()))
              for i in range(n_docs)]
    return pack_row(pieces, capacity=1024, round_to=round_to)  # padded at its end: n_real is used


class _Step:
    def __init__(self, mbs):
        self.micro_batches = mbs
        self.global_targets = sum(mb.n_targets for mb in mbs)
        self.global_bytes = sum(mb.n_bytes for mb in mbs)


def _count_step(stages: int, n_micro: int) -> list[str]:
    model = tiny_model(stages).train()
    ex = PlainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), n_stages=stages, grad_clip=1.0)
    mbs = [_micro_batch(i) for i in range(n_micro)]
    reads = HostReads()
    for mb in mbs:
        reads.host.update(id(t) for t in (mb.input_ids, mb.labels, mb.cu_seqlens))
    with reads.counting():
        res = ex.train_step(_Step(mbs))
    assert res.n_micro == n_micro and res.loss > 0
    return reads.sites


@pytest.mark.parametrize("stages", [1, 2])
def test_host_reads_per_micro_batch_are_one_per_level(stages):
    one, three = _count_step(stages, 1), _count_step(stages, 3)
    per_micro = (len(three) - len(one)) / 2
    print(f"stages={stages}: {per_micro} reads per micro-batch, {len(one)} for a 1-micro-batch step:\n  "
          + "\n  ".join(one))
    assert per_micro <= stages + CONSTANT, "\n".join(one)
    assert len(one) <= stages + CONSTANT + PER_STEP, "\n".join(one)


def test_the_counter_sees_the_reads_it_should():
    reads = HostReads()
    x = torch.arange(6.0)
    with reads.counting():
        x.sum().item(), x.tolist(), int(x[0]), float(x[1]), bool(x[2]), x[x > 2], x.nonzero()
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long))
        torch.repeat_interleave(x, torch.ones(6, dtype=torch.long), output_size=6)  # not a read
        x[:3], x[torch.tensor([1, 2])]  # not reads
    assert len(reads.sites) == 8, reads.sites
