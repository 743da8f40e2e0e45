"""The norms through F.rms_norm (one fused kernel each way on CUDA) compute on CPU what the
written-out formula computes, bit for bit, forward and gradients: a CPU run, its checkpoints and
the faithfulness to the public code do not move. What a GPU's fused kernel gives is checked by
scripts/gpu_check.py (the model on the GPU against the CPU)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pretrain.model.norm import GatedRMSNorm, RMSNorm


def _rms_written_out(x, weight, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _gated_written_out(y, z, weight, group_size, eps):
    g = y.float() * F.silu(z.float())
    shape = g.shape
    g = g.reshape(*shape[:-1], shape[-1] // group_size, group_size)
    g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
    return (g.reshape(shape) * weight.float()).to(y.dtype)


def _grads(out, inputs):
    torch.manual_seed(1)
    return torch.autograd.grad(out, inputs, torch.randn_like(out))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_is_the_written_out_formula_bit_for_bit(dtype):
    torch.manual_seed(0)
    norm = RMSNorm(96)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 37, 96).to(dtype).requires_grad_()
    out, ref = norm(x), _rms_written_out(x, norm.weight, norm.eps)
    assert out.dtype == dtype and torch.equal(out, ref)
    for a, b in zip(_grads(out, (x, norm.weight)), _grads(ref, (x, norm.weight))):
        assert torch.equal(a, b)


@pytest.mark.parametrize("ngroups", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rmsnorm_is_the_written_out_formula_bit_for_bit(ngroups, dtype):
    torch.manual_seed(0)
    d = 128
    norm = GatedRMSNorm(d, group_size=d // ngroups)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    y, z = (torch.randn(1, 41, d).to(dtype).requires_grad_() for _ in range(2))
    out, ref = norm(y, z), _gated_written_out(y, z, norm.weight, norm.group_size, norm.eps)
    assert out.dtype == dtype and torch.equal(out, ref)
    for a, b in zip(_grads(out, (y, z, norm.weight)), _grads(ref, (y, z, norm.weight))):
        assert torch.equal(a, b)
