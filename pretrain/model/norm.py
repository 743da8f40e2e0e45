"""RMSNorm and the gated RMSNorm of Mamba-2, computed in fp32.

Both normalise with `F.rms_norm`. On CPU torch computes it as the composite x * rsqrt(mean(x^2)
+ eps) * weight, the very operations written out (so the results are bit for bit the same); on
CUDA, with input and weight of one dtype, it dispatches to one fused kernel forward and one
backward (`at::_fused_rms_norm`, torch's aten/src/ATen/native/layer_norm.cpp) instead of six small
ones and about twice that in the backward. A GPU step of the H-Net was bound by the host's
dispatch of small operations (scripts/gpu_results/README.md), and a block runs two norms.
"""
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
        return F.rms_norm(xf, (xf.shape[-1],), self.weight.to(xf.dtype), self.eps).to(x.dtype)


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
        weight = self.weight.to(g.dtype)
        if self.group_size == shape[-1]:  # one group (ngroups=1): the weight inside the fused norm
            return F.rms_norm(g, (self.group_size,), weight, self.eps).to(y.dtype)
        g = g.reshape(*shape[:-1], shape[-1] // self.group_size, self.group_size)
        g = F.rms_norm(g, (self.group_size,), None, self.eps)
        return (g.reshape(shape) * weight).to(y.dtype)
