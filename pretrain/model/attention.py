"""Causal multi-head attention over packed documents, with partial rotary embeddings."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dtypes import upcast
from . import kernels
from .sequence import PackedSeqs


def rotary_cos_sin(position_ids: torch.Tensor, rotary_dim: int, base: float = 10000.0):
    """cos, sin of shape (T, rotary_dim) for the half-split (non-interleaved) rotary form."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim))
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # (T, r/2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of every head. x: (T, ..., Dh), e.g. (T, H, Dh) or q and
    k together as (T, 2, H, Dh); cos, sin: (T, r), broadcast over the middle dims."""
    r = cos.shape[-1]
    if r == 0:
        return x
    xr, rest = x.split([r, x.shape[-1] - r], dim=-1)  # one split: its backward is one cat
    xr = upcast(xr)
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    middle = (1,) * (x.dim() - 2)
    c, s = cos.view(cos.shape[0], *middle, r), sin.view(sin.shape[0], *middle, r)
    return torch.cat([(xr * c + rotated * s).to(x.dtype), rest], dim=-1)


def packed_causal_mask(seqs: PackedSeqs, window: int, start: int = 0, end: int | None = None) -> torch.Tensor:
    """(T, T) bool over positions [start, end), True where query i may attend key j: same document,
    j <= i, and i - j <= window when window >= 0 (a query sees keys i-window .. i, as
    flash-attn's window_size=(window, -1))."""
    seq = seqs.seq_idx[0, start:end]
    pos = seqs.position_ids[start:end]
    allowed = (seq.unsqueeze(1) == seq.unsqueeze(0)) & (pos.unsqueeze(1) >= pos.unsqueeze(0))
    if window >= 0:
        allowed &= (pos.unsqueeze(1) - pos.unsqueeze(0)) <= window
    return allowed


def document_groups(cu_seqlens: list[int], max_positions: int) -> list[tuple[int, int]]:
    """Split a packed row at document boundaries into spans of at most `max_positions` (a longer
    document is a span of its own), so the masked attention costs sum(span^2), not T^2."""
    spans, start = [], 0
    for prev, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        if end - start > max_positions and prev > start:
            spans.append((start, prev))
            start = prev
    spans.append((start, cu_seqlens[-1]))
    return spans


def sdpa_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seqs: PackedSeqs, window: int,
                max_span: int = 2048) -> torch.Tensor:
    """Attention over packed documents with SDPA and an explicit mask, one span of whole documents
    at a time. q, k, v: (T, H, Dh) -> (T, H, Dh)."""
    outs = []
    for start, end in document_groups(seqs.cu_list(), max_span):
        mask = packed_causal_mask(seqs, window, start, end)
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask).transpose(0, 1))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class CausalMHA(nn.Module):
    """Wqkv (rows: q, k, v blocks) -> rotary on the first `rotary_emb_dim` dims of q and k
    (positions restart per document) -> causal, optionally windowed attention -> out_proj."""

    def __init__(self, d_model: int, num_heads: int, rotary_emb_dim: int = 0, window_size: int = -1,
                 rotary_base: float = 10000.0, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads
        self.rotary_emb_dim, self.window_size, self.rotary_base = rotary_emb_dim, window_size, rotary_base
        self.Wqkv = nn.Linear(d_model, 3 * d_model, bias=False, **fk)
        self.out_proj = nn.Linear(d_model, d_model, bias=False, **fk)

    def forward(self, x: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        """x: (1, T, d_model) -> (1, T, d_model)."""
        T = x.shape[1]
        qkv = self.Wqkv(x[0]).view(T, 3, self.num_heads, self.head_dim)
        if self.rotary_emb_dim > 0:
            # q and k rotated by one set of operations (T, 2, H, Dh), not one set each: the same
            # elementwise arithmetic, half the launches (a GPU step was host-bound)
            cos, sin = seqs.rotary(self.rotary_emb_dim, self.rotary_base)
            qk, v = qkv.split([2, 1], dim=1)
            q, k = apply_rotary(qk, cos, sin).unbind(1)
            v = v.squeeze(1)
        else:
            q, k, v = qkv.unbind(1)
        flash = kernels.flash_varlen_attention(q)  # q's dtype: bf16 under autocast even for an fp32 input
        varlen = None if flash is not None else kernels.torch_varlen_attention(q, self.window_size)
        if flash is not None:
            out = flash(torch.stack([q, k, v], dim=1), seqs.cu_seqlens, seqs.max_seqlen, causal=True,
                        window_size=(self.window_size, -1))
        elif varlen is not None:
            out = varlen(q, k, v, seqs.cu_seqlens, seqs.max_seqlen, self.window_size)
        else:
            out = sdpa_packed(q, k, v, seqs, self.window_size)
        return self.out_proj(out.reshape(1, T, self.d_model))


class SwiGLU(nn.Module):
    """fc1 -> [y | gate]; fc2(silu(gate) * y). Hidden width rounded up to a multiple of 128."""

    def __init__(self, d_model: int, d_intermediate: int, multiple_of: int = 128, device=None, dtype=None):
        super().__init__()
        hidden = (d_intermediate + multiple_of - 1) // multiple_of * multiple_of
        self.fc1 = nn.Linear(d_model, 2 * hidden, bias=False, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden, d_model, bias=False, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2((F.silu(upcast(gate)) * upcast(y)).to(y.dtype))  # one rounding, as the fused swiglu
