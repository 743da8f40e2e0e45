"""The unit of work that flows from the data pipeline into the model: one packed micro-batch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

IGNORE_INDEX = -100  # label value for positions without a target (last byte of a document, padding)


@dataclass
class MicroBatch:
    """Documents packed into one row.

    input_ids:  (1, T) uint8 byte ids (BOS = 254 where a document starts).
    labels:     (1, T) int16 next byte within the same document, IGNORE_INDEX where there is none.
    Both stay narrow on the host (3 bytes per position, not 16); the model widens them to int64
    on its device.
    cu_seqlens: (n_docs + 1,) int32 document boundaries in the row, cu_seqlens[-1] == T.
    n_bytes:    real bytes in the row (T minus any padding added by row rounding).
    n_targets:  positions whose label is not IGNORE_INDEX (what the token-weighted loss counts).
    capacity:   the row budget this batch was packed against (for packing efficiency).
    keys:       "shard:key" of every document (segment) in the row, for error messages.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    n_bytes: int
    n_targets: int
    capacity: int
    keys: list[str] = field(default_factory=list)

    @property
    def packing_efficiency(self) -> float:
        return self.n_bytes / max(1, self.capacity)
