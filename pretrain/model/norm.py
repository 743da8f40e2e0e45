"""RMSNorm and the gated RMSNorm of Mamba-2, computed in fp32."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dtypes import upcast


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype)).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """rmsnorm(y * silu(z)) * weight, normalised over groups of `group_size` channels.

    The gate is applied before normalising (the public code's `norm_before_gate=False`).
    """

    def __init__(self, d: int, group_size: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.group_size = group_size
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        g = upcast(y) * F.silu(upcast(z))
        shape = g.shape
        g = g.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + self.eps)
        return (g.reshape(shape) * self.weight.to(g.dtype)).to(y.dtype)
