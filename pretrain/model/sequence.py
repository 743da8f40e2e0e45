"""Packed-sequence bookkeeping: documents laid end to end in one row, described by `cu_seqlens`."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PackedSeqs:
    """Where the documents of a packed row start and end, at one level of the hierarchy.

    cu_seqlens:   (n_docs + 1,) int32 on the model's device, cu_seqlens[0] = 0, cu_seqlens[-1] = T.
    seq_idx:      (1, T) int32 document index of every position (Mamba-2 resets on a change).
    position_ids: (T,) int64 position of every token inside its document (rotary restarts).
    max_seqlen:   longest document, in positions.
    cu_host:      cu_seqlens as Python ints. Everything the host needs (sizes, spans, max_seqlen)
                  comes from here, so no layer reads the device tensor back.
    """

    cu_seqlens: torch.Tensor
    seq_idx: torch.Tensor
    position_ids: torch.Tensor
    max_seqlen: int
    cu_host: list[int]
    _rotary: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def total(self) -> int:
        return self.cu_host[-1]

    def rotary(self, rotary_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the rotary embedding at these positions (attention.rotary_cos_sin), made once
        per level and shared by its attention layers: every layer of a level has the same positions,
        and each would otherwise launch the same ten small operations again (on a GPU the H-Net step
        is bound by the host's dispatch of small operations: scripts/gpu_results/README.md)."""
        key = (rotary_dim, base)
        if key not in self._rotary:
            from .attention import rotary_cos_sin

            self._rotary[key] = rotary_cos_sin(self.position_ids, rotary_dim, base)
        return self._rotary[key]

    def cu_list(self) -> list[int]:
        return self.cu_host

    @classmethod
    def from_host(cls, cu: list[int], device: torch.device | str = "cpu",
                  cu_seqlens: torch.Tensor | None = None) -> "PackedSeqs":
        """The documents of boundaries known on the host (level 0: the packer's; deeper levels: the
        one read of the chunk boundaries). Nothing here reads the device: the sizes of the
        repeat_interleave outputs are given (`output_size`), and the boundaries go to the device by
        an asynchronous copy unless `cu_seqlens` (already there) is passed."""
        device = torch.device(device)
        cu = [int(c) for c in cu]
        lengths = [b - a for a, b in zip(cu[:-1], cu[1:])]
        total = cu[-1]
        if cu_seqlens is None:
            cu_seqlens = _to_device(torch.tensor(cu, dtype=torch.int32), device)
        len_t = _to_device(torch.tensor(lengths, dtype=torch.int64), device)
        doc = torch.arange(len(lengths), device=device, dtype=torch.int32)
        seq_idx = torch.repeat_interleave(doc, len_t, output_size=total)
        starts = torch.repeat_interleave(cu_seqlens[:-1].long(), len_t, output_size=total)
        position_ids = torch.arange(total, device=device) - starts
        return cls(cu_seqlens.to(torch.int32), seq_idx.unsqueeze(0), position_ids, max(lengths, default=0), cu)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> "PackedSeqs":
        """The documents of boundaries held in a tensor: one read of it (a synchronisation when it
        is on an accelerator; none for a host tensor)."""
        return cls.from_host(cu_seqlens.tolist(), cu_seqlens.device, cu_seqlens)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without waiting for the device: a blocking copy from pageable
    memory synchronises the stream, while one from pinned memory with non_blocking=True is queued
    like a kernel (PyTorch's CUDA semantics notes, "Use pinned memory buffers")."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> list[int]:
    """Raise ValueError unless `cu_seqlens` is 0 = c_0 < c_1 < ... < c_n = total (no empty document);
    returns it as Python ints (one read: free for the host tensor the packer built)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if cu[-1] != total:
        raise ValueError(f"cu_seqlens must end at the row length {total} (cover the row), got {cu[-1]}")
    bad = next((i for i in range(len(cu) - 1) if cu[i + 1] <= cu[i]), None)
    if bad is not None:
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty document): document {bad} spans "
                         f"[{cu[bad]}, {cu[bad + 1]})")
    return cu
