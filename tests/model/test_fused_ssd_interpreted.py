"""The model's fused path through mamba_ssm's real Triton SSD kernels, on this CPU.

On a GPU, Mamba2.forward hands the chunked scan to mamba_ssm's `mamba_chunk_scan_combined`
(pretrain/model/kernels.py); everywhere else the pure-PyTorch `ssd_scan` runs, which is what the
rest of the suite checks against the public H-Net. These tests run the Triton kernels
themselves under Triton's interpreter (tests/model/triton_interpreter.py) and check that the
fused path computes what the pure one does: the kernel on packed documents, forward and every
gradient, in fp32, bf16 and fp16; the whole model, 1 and 2 stages; and the model under bf16
autocast, the trainer's GPU precision, where the kernel takes bf16 x, dt, B, C beside fp32 A, D
and dt_bias.

Where the line is: the interpreter runs the kernels' arithmetic in NumPy, not a GPU's; its
bfloat16 products are mended (triton_interpreter.py says how). The GPU check
(scripts/gpu_check.py) compares the two paths on a device, at full sizes.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from pretrain.model import kernels
from tests.model import triton_interpreter
from tests.model.conftest import tiny_model

pytestmark = pytest.mark.slow

# Chunks of 64 and 16-wide heads: the interpreter's cost grows with the number of program
# instances (chunks x heads), and these keep a model's forward and backward near 20 s.
SSM = dict(d_state=16, headdim=16, chunk_size=64, d_conv=4, expand=2)


@pytest.fixture(scope="module")
def interpreter():
    why = triton_interpreter.missing()
    if why:
        pytest.fail(f"{why}: these tests need `make setup`'s Triton and mamba-ssm sources")
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "HNET_TRITON_ON_CPU", "HNET_DISABLE_FUSED")}
    kernels._module.cache_clear()  # an earlier test may have found mamba_ssm not importable
    triton_interpreter.enable()
    yield triton_interpreter
    for k, v in saved.items():  # the rest of the session runs as before: no mamba_ssm, pure path
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    for name in [m for m in sys.modules if m == "mamba_ssm" or m.startswith("mamba_ssm.")]:
        del sys.modules[name]
    kernels._module.cache_clear()


def launches() -> int:
    return sum(triton_interpreter.LAUNCHES.values())


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| over the whole tensor (L2)."""
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp(min=1e-30))


def packed_seq_idx(lengths: list[int]) -> torch.Tensor:
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).int().unsqueeze(0).contiguous()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_kernel_matches_the_pure_scan_on_packed_documents(interpreter, dtype, tol):
    """mamba_chunk_scan_combined with seq_idx, D, dt_bias and softplus, as Mamba2.forward calls it,
    against ssd_scan in fp32 on the same inputs: the output and the gradients of all seven inputs.
    The documents: one over three chunks, one byte, one ending exactly on a chunk boundary (the
    scan's state must be reset there, not carried), and a short last one."""
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    from pretrain.model.ssd import ssd_scan

    torch.manual_seed(0)
    chunk, h, p, n = 32, 2, 16, 16
    lengths = [70, 1, 89, 32]  # 70 + 1 + 89 = 160 = 5 chunks of 32
    L = sum(lengths)
    seq = packed_seq_idx(lengths)
    x = torch.randn(1, L, h, p).to(dtype).requires_grad_(True)
    dt_raw = (torch.randn(1, L, h) * 0.5 - 2).to(dtype).requires_grad_(True)
    B = torch.randn(1, L, 1, n).to(dtype).requires_grad_(True)
    C = torch.randn(1, L, 1, n).to(dtype).requires_grad_(True)
    A = (-torch.rand(h) * 4 - 0.5).requires_grad_(True)
    D = torch.randn(h).requires_grad_(True)
    dt_bias = (torch.randn(h) * 0.1).requires_grad_(True)
    inputs = (x, dt_raw, B, C, A, D, dt_bias)

    before = launches()
    y_fused = mamba_chunk_scan_combined(x, dt_raw, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias,
                                        dt_softplus=True, seq_idx=seq)
    assert launches() > before and y_fused.dtype == dtype
    dt = torch.nn.functional.softplus(dt_raw.float() + dt_bias)
    y_pure = ssd_scan(x.float(), dt, A, B.float(), C.float(), 16, seq) + x.float() * D.unsqueeze(-1)
    g = torch.randn(y_pure.shape)
    grads_fused = torch.autograd.grad(y_fused, inputs, g.to(dtype))
    grads_pure = torch.autograd.grad(y_pure, inputs, g)
    errors = {"y": rel(y_fused, y_pure)}
    errors.update({name: rel(gf, gp) for name, gf, gp in zip(("x", "dt", "B", "C", "A", "D", "dt_bias"),
                                                             grads_fused, grads_pure)})
    assert max(errors.values()) < tol, errors


@pytest.mark.parametrize("d", [64, 48, 40])
def test_dechunk_ema_on_the_fused_scan_matches_the_pure_one(interpreter, d):
    """The dechunking EMA through mamba_chunk_scan_combined (heads of 32 channels, or 16 where 32
    does not divide the width; a width of neither stays on the pure scan) against ema_scan: the
    output and the gradients of the chunk values and the boundary probabilities, over documents
    that span chunks of 256, end on a chunk boundary, or are one chunk long."""
    from pretrain.model.dynamic_chunking import ema
    from pretrain.model.ssd import ema_reference, ema_scan

    torch.manual_seed(0)
    lengths = [300, 1, 211, 256, 40]  # 300 + 1 + 211 = 512: the fourth document is chunk 3 exactly
    M = sum(lengths)
    seq = packed_seq_idx(lengths)
    h = torch.randn(1, M, d, requires_grad=True)
    p = (torch.rand(1, M) * 0.98 + 0.01).requires_grad_(True)
    before = launches()
    y_fused = ema(h, p, seq)
    assert (launches() > before) == (d % 16 == 0)
    y_pure = ema_scan(h, p, seq)
    assert rel(y_pure, ema_reference(h, p, seq)) < 1e-5
    g = torch.randn(y_pure.shape)
    errors = {"y": rel(y_fused, y_pure)}
    for name, a, b in zip(("h", "p"), torch.autograd.grad(y_fused, (h, p), g), torch.autograd.grad(y_pure, (h, p), g)):
        errors[name] = rel(a, b)
    assert max(errors.values()) < 1e-5, errors


def run_model(model, ids, cu, fused: bool, autocast_dtype=None):
    os.environ["HNET_DISABLE_FUSED"] = "0" if fused else "1"
    model.zero_grad()
    labels = torch.roll(ids, -1, 1)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.float16, enabled=autocast_dtype is not None):
        out = model(ids, cu_seqlens=cu, labels=labels)
        (out.loss + out.ratio_loss).backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach().double(), grads


def packed_batch(seed: int = 1):
    torch.manual_seed(seed)
    return torch.randint(0, 256, (1, 200)), torch.tensor([0, 70, 71, 150, 200], dtype=torch.int32)


def all_grads(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


@pytest.mark.parametrize("stages", [1, 2])
def test_model_on_the_fused_scan_matches_the_pure_path(interpreter, stages):
    """A whole packed forward and backward of the H-Net in fp32: logits and every parameter's
    gradient (routing, chunk levels, residual_proj included) agree, and the fused run did go
    through the Triton kernels while the pure one did not."""
    model = tiny_model(stages, ssm_cfg=SSM).train()
    ids, cu = packed_batch()
    before = launches()
    logits_p, grads_p = run_model(model, ids, cu, fused=False)
    assert launches() == before
    logits_f, grads_f = run_model(model, ids, cu, fused=True)
    assert launches() > before
    assert set(grads_f) == set(grads_p)
    assert rel(logits_f, logits_p) < 1e-5
    worst = max(grads_p, key=lambda k: rel(grads_f[k], grads_p[k]))
    assert rel(grads_f[worst], grads_p[worst]) < 1e-4, (worst, rel(grads_f[worst], grads_p[worst]))


def test_model_under_bf16_autocast_is_no_worse_on_the_fused_scan(interpreter):
    """Under bf16 autocast, as the trainer runs on a GPU, the kernel gets bf16 activations and
    fp32 parameters.
    Against the fp32 model, the fused path's error in logits and gradients stays within the pure
    path's at the same precision (the two differ only in the scan)."""
    model = tiny_model(1, ssm_cfg=SSM).train()
    ids, cu = packed_batch()
    ref_logits, ref_grads = run_model(model, ids, cu, fused=False)
    before = launches()
    fused_logits, fused_grads = run_model(model, ids, cu, fused=True, autocast_dtype=torch.bfloat16)
    assert launches() > before
    pure_logits, pure_grads = run_model(model, ids, cu, fused=False, autocast_dtype=torch.bfloat16)
    ref_all = all_grads(ref_grads)
    fused_err = (rel(fused_logits, ref_logits), rel(all_grads(fused_grads), ref_all))
    pure_err = (rel(pure_logits, ref_logits), rel(all_grads(pure_grads), ref_all))
    assert all(0 < p < 5e-2 for p in pure_err), pure_err  # autocast did run in bf16
    assert all(f <= 1.5 * p + 1e-4 for f, p in zip(fused_err, pure_err)), (fused_err, pure_err)
