"""Dynamic chunking (paper section 2.2): routing, chunk, dechunk, confidence STE, ratio loss."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .dtypes import upcast
from .sequence import PackedSeqs
from .ssd import ema_scan


class RoutingOutput(NamedTuple):
    """Routing decisions for the positions of one stage (packed row of T positions).

    boundary_prob:  (T,) p_t in [0, 1]; 1 at every document start.
    boundary_mask:  (T,) bool b_t = p_t > 0.5.
    selected_probs: (T,) confidence c_t = p_t if b_t else 1 - p_t.
    cu_lists:       after chunking, (this level's cu_seqlens, the next level's) as Python ints:
                    the real positions of the next level are then known on the host.
    """

    boundary_prob: torch.Tensor
    boundary_mask: torch.Tensor
    selected_probs: torch.Tensor
    cu_lists: tuple[list[int], list[int]] | None = None


class RoutingModule(nn.Module):
    """p_t = (1 - cos(W_q x_{t-1}, W_k x_t)) / 2, with W_q, W_k initialised to the identity.

    The public code applies q to the previous position and k to the current one (the paper
    writes it the other way round); we keep the public convention so public weights load.
    """

    def __init__(self, d_model: int, device=None, dtype=None):
        super().__init__()
        self.q_proj_layer = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        self.k_proj_layer = nn.Linear(d_model, d_model, bias=False, device=device, dtype=dtype)
        if self.q_proj_layer.weight.device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.q_proj_layer.weight.copy_(torch.eye(self.q_proj_layer.weight.shape[0]))
        self.k_proj_layer.weight.copy_(torch.eye(self.k_proj_layer.weight.shape[0]))

    def forward(self, hidden: torch.Tensor, seqs: PackedSeqs) -> RoutingOutput:
        """hidden: (1, T, D)."""
        h = hidden[0]
        q = F.normalize(self.q_proj_layer(h[:-1]), dim=-1)
        k = F.normalize(self.k_proj_layer(h[1:]), dim=-1)
        cos = (upcast(q) * upcast(k)).sum(-1)
        p = torch.clamp((1 - cos) / 2, min=0.0, max=1.0)
        p = F.pad(p, (1, 0), value=1.0)
        # Every document starts a chunk: its first position gets p = 1 (no gradient through it).
        is_start = torch.zeros_like(p, dtype=torch.bool)
        is_start[seqs.cu_seqlens[:-1].long()] = True
        p = torch.where(is_start, torch.ones_like(p), p)
        mask = p > 0.5
        selected = torch.where(mask, p, 1 - p)
        return RoutingOutput(boundary_prob=p, boundary_mask=mask, selected_probs=selected)


def chunk(hidden: torch.Tensor, routing: RoutingOutput, seqs: PackedSeqs) -> tuple[torch.Tensor, PackedSeqs]:
    """Keep the boundary positions. (1, T, D) -> (1, M, D) and the next level's documents:
    its cu_seqlens is the cumulative boundary count at each document end."""
    counts = torch.cumsum(routing.boundary_mask.to(torch.int64), 0)
    next_cu = F.pad(counts[seqs.cu_seqlens[1:].long() - 1], (1, 0)).to(torch.int32)
    # The one host read of a level, inherent to dynamic chunking: the chunk count M sizes every
    # tensor of the next level, and its document boundaries (read with it) give max_seqlen and the
    # spans the host needs. Everything else of the level is then sized without reading the device.
    inner_seqs = PackedSeqs.from_host(next_cu.tolist(), hidden.device, next_cu)
    return hidden[:, boundary_positions(counts, inner_seqs.total)], inner_seqs


def boundary_positions(counts: torch.Tensor, n_chunks: int) -> torch.Tensor:
    """(M,) int64 positions of the boundaries, from the running boundary count (T,) and M. The
    same elements as indexing with the boolean mask, but a boolean index (like nonzero) sizes its
    output from the data and so reads the device; the j-th boundary is the first position whose
    count reaches j, found by a binary search of a known size."""
    wanted = torch.arange(1, n_chunks + 1, device=counts.device, dtype=counts.dtype)
    return torch.searchsorted(counts, wanted)


def dechunk(chunked: torch.Tensor, routing: RoutingOutput, inner_seqs: PackedSeqs) -> torch.Tensor:
    """Smooth the chunk sequence with an EMA weighted by the boundary probabilities (eq. 5),
    resetting at document starts, then upsample: each position takes the value of the most
    recent chunk. (1, M, D) -> (1, T, D), fp32."""
    counts = torch.cumsum(routing.boundary_mask.to(torch.int64), 0)
    ct = torch.promote_types(chunked.dtype, torch.float32)
    at_boundaries = boundary_positions(counts, inner_seqs.total)
    p = routing.boundary_prob.to(ct).clamp(min=1e-4, max=1 - 1e-4)[at_boundaries].unsqueeze(0)  # (1, M)
    smoothed = ema(chunked.to(ct), p, inner_seqs.seq_idx)
    plug_back = counts - 1
    return smoothed[:, plug_back]


EMA_CHUNK = 256  # the public code's block size for this scan


def ema(h: torch.Tensor, p: torch.Tensor, seq_idx: torch.Tensor) -> torch.Tensor:
    """The dechunking EMA (eq. 5) over (1, M, D) in h's dtype (fp32 or wider), reset at document
    starts: mamba_ssm's fused SSD scan where it runs (as the public code runs it), else the pure
    `ema_scan`. Both compute the same scan, with one head of d_state 1 per group of channels, A = -1
    and dt = -log(1 - p), so the decay is 1 - p and the input weight p. Forward and backward, the
    fused one dispatches 100 ATen operations and 19 kernel launches at any M, the pure one 191 at
    M = 200 and 387 at M = 2,730 (it carries the state chunk by chunk; `python
    tests/bench/bench_host_ops.py --ema 200,2730`); a
    GPU step was bound by the host's dispatch (scripts/gpu_results/README.md)."""
    scan = kernels.mamba_chunk_scan(h)
    d = h.shape[-1]
    headdim = next((hd for hd in (32, 16) if d % hd == 0), None)  # Triton's dot needs 16 or more
    if scan is None or headdim is None or h.dtype != torch.float32:
        return ema_scan(h, p, seq_idx, chunk_size=EMA_CHUNK)
    b, m, _ = h.shape
    nheads = d // headdim
    with torch.autocast(h.device.type, enabled=False):  # the scan in fp32, as the pure one
        p = p.to(h.dtype)
        dt = -torch.log1p(-p)  # (b, m)
        x = (h * (p / dt).unsqueeze(-1)).view(b, m, nheads, headdim)
        ones = torch.ones(b, m, 1, 1, device=h.device, dtype=h.dtype)  # B = C = 1, one group
        A = -torch.ones(nheads, device=h.device, dtype=torch.float32)
        y = scan(x, dt.unsqueeze(-1).expand(b, m, nheads), A, ones, ones, chunk_size=EMA_CHUNK,
                 seq_idx=seq_idx)
    return y.reshape(b, m, d)


class _StraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.ones_like(x)

    @staticmethod
    def backward(ctx, grad_output):
        return grad_output


def ste(x: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator of the confidence: 1 in the forward pass, identity gradient."""
    return _StraightThrough.apply(x)


def ratio_loss(F_: torch.Tensor, G: torch.Tensor, target: float) -> torch.Tensor:
    """Eq. 10: N/(N-1) * ((N-1) F G + (1-F)(1-G)), F = fraction of boundaries, G = mean boundary
    probability. Its minimum 1 is at F = G = 1/N."""
    N = float(target)
    return N / (N - 1) * ((N - 1) * F_ * G + (1 - F_) * (1 - G))
