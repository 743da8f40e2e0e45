"""Fused-kernel selection is reported, never silent (pretrain/model/kernels.py)."""
from __future__ import annotations

import pytest

from pretrain.model import kernels


def test_cpu_status_names_the_device():
    st = kernels.status("cpu")
    assert set(st) == {"mamba_ssm", "causal_conv1d", "flash_attn", "torch_varlen_attn"}
    assert all(v.startswith("inactive: tensors on cpu") for v in st.values())
    kernels.check_required("cpu", True)  # nothing fused can run on a CPU: not an error


def test_missing_fused_kernel_on_cuda_names_the_import_error(monkeypatch):
    monkeypatch.delenv("HNET_DISABLE_FUSED", raising=False)
    st = kernels.status("cuda")
    missing = {k: v for k, v in st.items() if v != "active"}
    if not missing:
        pytest.skip("every fused package imports here")
    for v in missing.values():
        assert v.startswith("inactive: import failed (") and "Error" in v, v
    with pytest.raises(RuntimeError) as e:
        kernels.check_required("cuda", True)
    attention = {"flash_attn", "torch_varlen_attn"}
    required = set(missing) - attention if attention - set(missing) else set(missing)  # one attention is enough
    for name in required:
        assert name in str(e.value)
    if st["torch_varlen_attn"] == "active":  # torch's own FlashAttention stands in for flash-attn
        assert "flash_attn (" not in str(e.value)
    assert "train.require_fused=false" in str(e.value)
    kernels.check_required("cuda", False)  # knowingly on the pure path


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("HNET_DISABLE_FUSED", "1")
    assert all(v == "inactive: HNET_DISABLE_FUSED=1" for v in kernels.status("cuda").values())
    kernels.check_required("cuda", True)
