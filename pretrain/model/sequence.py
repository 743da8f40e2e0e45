"""Packed-sequence bookkeeping: documents laid end to end in one row, described by `cu_seqlens`."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedSeqs:
    """Where the documents of a packed row start and end, at one level of the hierarchy.

    cu_seqlens:   (n_docs + 1,) int32, cu_seqlens[0] = 0, cu_seqlens[-1] = T.
    seq_idx:      (1, T) int32 document index of every position (Mamba-2 resets on a change).
    position_ids: (T,) int64 position of every token inside its document (rotary restarts).
    max_seqlen:   longest document, in positions.
    """

    cu_seqlens: torch.Tensor
    seq_idx: torch.Tensor
    position_ids: torch.Tensor
    max_seqlen: int
    _cu_list: list[int] | None = None

    @property
    def total(self) -> int:
        return self.seq_idx.shape[1]

    def cu_list(self) -> list[int]:
        """cu_seqlens as Python ints, read from the device once per level (not once per layer)."""
        if self._cu_list is None:
            self._cu_list = self.cu_seqlens.tolist()
        return self._cu_list

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor) -> "PackedSeqs":
        cu = cu_seqlens.to(torch.int32)
        lengths = (cu[1:] - cu[:-1]).long()
        total = int(cu[-1])
        seq_idx = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device, dtype=torch.int32), lengths)
        starts = torch.repeat_interleave(cu[:-1].long(), lengths)
        position_ids = torch.arange(total, device=cu.device) - starts
        return cls(cu, seq_idx.unsqueeze(0), position_ids, int(lengths.max()) if len(lengths) else 0)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """Raise ValueError unless `cu_seqlens` is 0 = c_0 < c_1 < ... < c_n = total (no empty document)."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 (or int64), got {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    if int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must end at the row length {total} (cover the row), got {int(cu_seqlens[-1])}")
    steps = cu_seqlens[1:] - cu_seqlens[:-1]
    if bool((steps <= 0).any()):
        bad = int(torch.nonzero(steps <= 0)[0])
        raise ValueError(f"cu_seqlens must be strictly increasing (no empty document): document {bad} spans "
                         f"[{int(cu_seqlens[bad])}, {int(cu_seqlens[bad + 1])})")
