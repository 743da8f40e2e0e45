"""Mamba-2 mixer with the public parameter names, in pure PyTorch (fused kernels on CUDA)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dtypes import upcast
from . import kernels
from .norm import GatedRMSNorm
from .sequence import PackedSeqs
from .ssd import ssd_scan


def causal_conv1d_reset(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        seq_idx: torch.Tensor | None) -> torch.Tensor:
    """Depthwise causal conv over time that does not look across document starts.

    x: (b, l, c); weight: (c, 1, k); bias: (c,); seq_idx: (b, l). Returns (b, l, c), before activation.
    """
    b, l, c = x.shape
    k = weight.shape[-1]
    w = weight.squeeze(1)  # (c, k); w[:, k-1] multiplies x_t, w[:, k-1-s] multiplies x_{t-s}
    out = x * w[:, k - 1]
    for s in range(1, k):
        shifted = F.pad(x, (0, 0, s, 0))[:, :l]
        if seq_idx is not None:
            same = F.pad(seq_idx, (s, 0), value=-1)[:, :l] == seq_idx
            shifted = shifted * same.unsqueeze(-1).to(x.dtype)
        out = out + shifted * w[:, k - 1 - s]
    if bias is not None:
        out = out + bias
    return out


class Mamba2(nn.Module):
    """in_proj -> [z | xBC | dt]; causal conv + SiLU on xBC; SSD scan; D skip; gated RMSNorm; out_proj.

    Its forward reads `conv1d.weight` directly (and the fused path reads all child weights),
    so under ZeRO-3 it must be a leaf module: see `zero3_leaf_modules()`.
    """

    def __init__(self, d_model: int, d_state: int = 128, d_conv: int = 4, expand: int = 2,
                 headdim: int = 64, ngroups: int = 1, chunk_size: int = 256,
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4,
                 A_init_range: tuple[float, float] = (1.0, 16.0), device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.headdim, self.ngroups, self.chunk_size = headdim, ngroups, chunk_size
        self.d_inner = expand * d_model
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * ngroups * d_state
        self.dt_min, self.dt_max, self.dt_init_floor, self.A_init_range = dt_min, dt_max, dt_init_floor, A_init_range
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner + 2 * ngroups * d_state + self.nheads, bias=False, **fk)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=True, **fk)
        self.dt_bias = nn.Parameter(torch.empty(self.nheads, **fk))
        self.A_log = nn.Parameter(torch.empty(self.nheads, **fk))
        self.D = nn.Parameter(torch.empty(self.nheads, **fk))
        self.norm = GatedRMSNorm(self.d_inner, group_size=self.d_inner // ngroups, eps=1e-5, **fk)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **fk)
        if self.dt_bias.device.type != "meta":
            self.reset_ssm_parameters()

    @torch.no_grad()
    def reset_ssm_parameters(self) -> None:
        """Mamba-2's own init: dt log-uniform in [dt_min, dt_max] (stored as its inverse softplus),
        A uniform in A_init_range (stored as log), D = 1."""
        dt = torch.exp(torch.rand(self.nheads, device=self.dt_bias.device) * (math.log(self.dt_max) - math.log(self.dt_min))
                       + math.log(self.dt_min)).clamp(min=self.dt_init_floor)
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        A = torch.empty(self.nheads, device=self.A_log.device).uniform_(*self.A_init_range)
        self.A_log.copy_(torch.log(A))
        self.D.fill_(1.0)

    def forward(self, u: torch.Tensor, seqs: PackedSeqs) -> torch.Tensor:
        """u: (1, T, d_model) packed documents -> (1, T, d_model)."""
        b, l, _ = u.shape
        zxbcdt = self.in_proj(u)
        z, xBC, dt = torch.split(zxbcdt, [self.d_inner, self.conv_dim, self.nheads], dim=-1)
        seq_idx = seqs.seq_idx

        # causal_conv1d wants channel-last memory and, with seq_idx, a channel stride that is a
        # multiple of 8: give it a contiguous copy, and use it only for such widths.
        fused_conv = kernels.causal_conv1d(u) if self.conv_dim % 8 == 0 else None
        if fused_conv is not None:
            xBC = fused_conv(xBC.contiguous().transpose(1, 2), self.conv1d.weight.squeeze(1), self.conv1d.bias,
                             seq_idx=seq_idx, activation="silu").transpose(1, 2)
        else:  # multiply-adds in fp32, as the fused kernel accumulates
            xBC = F.silu(causal_conv1d_reset(upcast(xBC), upcast(self.conv1d.weight), upcast(self.conv1d.bias),
                                             seq_idx)).to(xBC.dtype)

        x, B, C = torch.split(xBC, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        x = x.reshape(b, l, self.nheads, self.headdim)
        B = B.reshape(b, l, self.ngroups, self.d_state)
        C = C.reshape(b, l, self.ngroups, self.d_state)
        A = -torch.exp(upcast(self.A_log))

        fused_scan = kernels.mamba_chunk_scan(u)
        if fused_scan is not None:
            y = fused_scan(x, dt, A, B, C, chunk_size=self.chunk_size, D=self.D, z=None,
                           dt_bias=self.dt_bias, dt_softplus=True, seq_idx=seq_idx)
        else:
            dt = F.softplus(upcast(dt) + upcast(self.dt_bias))
            # the D skip is added before the one rounding to the model dtype, as in the fused kernel
            y = ssd_scan(upcast(x), dt, A, B, C, kernels.pure_ssd_chunk_size(u, self.chunk_size), seq_idx)
            y = (y + upcast(x) * upcast(self.D).unsqueeze(-1)).to(x.dtype)
        y = self.norm(y.reshape(b, l, self.d_inner), z)
        return self.out_proj(y)
