"""The one place where fused CUDA kernels are chosen over the pure-PyTorch path.

A fused kernel is used only when the tensor is on a CUDA device and the package imports.
Nothing here imports mamba_ssm, causal_conv1d or flash_attn at module import time: mamba_ssm
cannot even be imported without its compiled CUDA extension. Set HNET_DISABLE_FUSED=1 to force
the pure-PyTorch path everywhere (used to compare the two paths on a GPU).

HNET_TRITON_ON_CPU=1 lets the one Triton kernel here (mamba_ssm's chunked SSD scan) take CPU
tensors, for running it under Triton's interpreter (TRITON_INTERPRET=1), which executes a
kernel's program instances with NumPy. The tests use it to train through the fused scan
without a GPU (tests/model/triton_interpreter.py); it is far too slow for anything else. The
CUDA C++ kernels (causal_conv1d, flash-attn, varlen_attn) stay CUDA only.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os

import torch


_IMPORT_ERRORS: dict[str, str] = {}

# What each fused package accelerates, and the module that must import for it.
FUSED = {"mamba_ssm": ("the Mamba-2 chunked scan and the dechunking EMA", "mamba_ssm.ops.triton.ssd_combined"),
         "causal_conv1d": ("the Mamba-2 causal convolution", "causal_conv1d"),
         "flash_attn": ("varlen attention (bf16/fp16)", "flash_attn"),
         "torch_varlen_attn": ("varlen attention without flash-attn (bf16/fp16)", "torch.nn.attention.varlen")}


@functools.lru_cache(maxsize=None)
def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception as e:  # ImportError, or an OSError/RuntimeError from a missing CUDA extension
        _IMPORT_ERRORS[name] = f"{type(e).__name__}: {e}"
        return None


def _fused_allowed(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("HNET_DISABLE_FUSED", "0") != "1"


def _triton_on_cpu() -> bool:
    return os.environ.get("HNET_TRITON_ON_CPU", "0") == "1"


def _triton_allowed(t: torch.Tensor) -> bool:
    return _fused_allowed(t) or (t.device.type == "cpu" and _triton_on_cpu()
                                 and os.environ.get("HNET_DISABLE_FUSED", "0") != "1")


def mamba_chunk_scan(t: torch.Tensor):
    """mamba_ssm's fused chunked SSD scan, or None where it cannot be used for `t`."""
    if not _triton_allowed(t):
        return None
    mod = _module("mamba_ssm.ops.triton.ssd_combined")
    return getattr(mod, "mamba_chunk_scan_combined", None) if mod else None


def causal_conv1d(t: torch.Tensor):
    """causal_conv1d's fused depthwise causal conv (with seq_idx), or None."""
    if not _fused_allowed(t):
        return None
    mod = _module("causal_conv1d")
    return getattr(mod, "causal_conv1d_fn", None) if mod else None


def _flash_shape_dtype(t: torch.Tensor) -> bool:
    """FlashAttention (flash-attn, and torch's varlen_attn, which is FlashAttention inside torch)
    takes fp16/bf16 heads whose size is a multiple of 8, up to 256: "head_size must be a multiple
    of 8" was a tiny test model's error on a GPU. Other heads go to sdpa_packed."""
    head_dim = t.shape[-1]
    return t.dtype in (torch.float16, torch.bfloat16) and head_dim % 8 == 0 and head_dim <= 256


def flash_varlen_attention(t: torch.Tensor):
    """flash-attn's varlen packed-QKV attention for heads shaped like `t` (T, H, Dh), or None (it
    needs fp16/bf16 CUDA tensors and FlashAttention's head sizes)."""
    if not _fused_allowed(t) or not _flash_shape_dtype(t):
        return None
    mod = _module("flash_attn")
    return getattr(mod, "flash_attn_varlen_qkvpacked_func", None) if mod else None


def torch_varlen_attention(t: torch.Tensor, window: int = -1):
    """FlashAttention inside torch (`torch.nn.attention.varlen.varlen_attn`, torch >= 2.10, CUDA
    only) for when flash-attn is not installed: a callable (q, k, v, cu_seqlens, max_seqlen,
    window) -> out on (T, H, Dh) tensors, or None. Causal attention is its window (left, 0): a
    query at i sees keys i - left .. i, as flash-attn's window_size=(left, -1) with causal=True
    (left -1: no limit), the model's sliding-window convention. torch 2.10's varlen_attn has no
    window (only is_causal): there it serves the layers without one (`window` < 0) only."""
    if not _fused_allowed(t) or not _flash_shape_dtype(t):
        return None
    if flash_varlen_attention(t) is not None:
        return None  # flash-attn first where it is installed
    mod = _module("torch.nn.attention.varlen")
    fn = getattr(mod, "varlen_attn", None) if mod else None
    return varlen_caller(fn, window) if fn is not None else None


@functools.lru_cache(maxsize=None)  # asked at every attention forward: inspect the signature once
def varlen_caller(fn, window: int):
    """How to call this torch's `varlen_attn` for a causal layer with `window` (-1: none), or
    None when it cannot: torch 2.10 takes `is_causal` and no `window_size`."""
    params = inspect.signature(fn).parameters
    if "window_size" in params:
        def attend(q, k, v, cu_seqlens, max_seqlen: int, window: int):
            cu = cu_seqlens.to(torch.int32)
            return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, window_size=(window if window >= 0 else -1, 0))
    elif window < 0 and "is_causal" in params:
        def attend(q, k, v, cu_seqlens, max_seqlen: int, window: int):
            cu = cu_seqlens.to(torch.int32)
            return fn(q, k, v, cu, cu, max_seqlen, max_seqlen, is_causal=True)
    else:
        return None
    return attend


def pure_ssd_chunk_size(t: torch.Tensor, configured: int) -> int:
    """Chunk length for the pure-PyTorch SSD scan. The result does not depend on it (it only
    regroups the same sums); on CPU, 64 is about 2x faster than the fused kernels' 256 at
    d_state 128 (tests/bench/bench_model.py), since the in-chunk work grows with the chunk."""
    return configured if t.is_cuda else min(configured, 64)


def available() -> dict[str, bool]:
    """Which fused packages import on this machine (for logs and the GPU check script)."""
    return {name: _module(name) is not None for name in ("mamba_ssm", "causal_conv1d", "flash_attn")}


def status(device_type: str) -> dict[str, str]:
    """Per fused package, "active" (for torch 2.10's varlen_attn, "active for layers without a
    sliding window ...") or "inactive: <why>" (the import error, the device, or
    HNET_DISABLE_FUSED), for tensors on a `device_type` device. For the start-up log and the
    MLflow params (kernels.*)."""
    out = {}
    for name, (what, module) in FUSED.items():
        if os.environ.get("HNET_DISABLE_FUSED", "0") == "1":
            out[name] = "inactive: HNET_DISABLE_FUSED=1"
        elif device_type == "cpu" and name == "mamba_ssm" and _triton_on_cpu():
            out[name] = ("active (Triton interpreter on CPU, HNET_TRITON_ON_CPU=1)" if _module(module) is not None
                         else f"inactive: import failed ({_IMPORT_ERRORS.get(module, 'unknown error')})")
        elif device_type != "cuda":
            out[name] = f"inactive: tensors on {device_type} (fused kernels are CUDA only)"
        elif _module(module) is None:
            out[name] = f"inactive: import failed ({_IMPORT_ERRORS.get(module, 'unknown error')})"
        elif name == "torch_varlen_attn" and _module("flash_attn") is not None:
            out[name] = "inactive: flash_attn is installed and is used first"
        elif name == "torch_varlen_attn" and varlen_caller(_module(module).varlen_attn, 0) is None:
            out[name] = "active for layers without a sliding window (this torch's varlen_attn has no window_size)"
        else:
            out[name] = "active"
    return out


def check_required(device_type: str, require: bool) -> None:
    """On CUDA with `require`, raises RuntimeError naming every fused kernel that is missing and
    its import error (a silent fall-back to the pure path would be several times slower)."""
    if device_type != "cuda" or not require or os.environ.get("HNET_DISABLE_FUSED", "0") == "1":
        return
    st = status(device_type)
    if st.get("flash_attn") == "active" or st.get("torch_varlen_attn", "").startswith("active"):
        st.pop("flash_attn"), st.pop("torch_varlen_attn")  # one fast attention is enough
    missing = {k: v for k, v in st.items() if v != "active"}
    if missing:
        lines = "; ".join(f"{k} ({FUSED[k][0]}): {v[len('inactive: '):]}" for k, v in missing.items())
        raise RuntimeError(f"fused kernels missing on CUDA: {lines}. Install them with pip install -e '.[cuda]', "
                           f"or run the pure-PyTorch path knowingly with train.require_fused=false")
