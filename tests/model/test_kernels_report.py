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


def test_varlen_call_follows_the_installed_torch_signature():
    """torch >= 2.11's varlen_attn takes window_size=(left, right); torch 2.10's only is_causal. The
    model's window w (-1: none) must become (w, 0) on the first, and a windowed layer must not call
    the second (it would attend over the whole document). Both torch releases cannot be installed
    here, and varlen_attn does not run on a CPU: stand-ins with the two public signatures."""
    import torch

    calls = []

    def varlen_2_11(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                    window_size=(-1, -1)):
        calls.append(("2.11", cu_seq_q.dtype, max_q, window_size))
        return q

    def varlen_2_10(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append(("2.10", cu_seq_q.dtype, max_q, is_causal))
        return q

    q = torch.zeros(5, 2, 4)
    cu = torch.tensor([0, 2, 5])
    for window in (3, -1):
        kernels.varlen_caller(varlen_2_11, window)(q, q, q, cu, 3, window)
    kernels.varlen_caller(varlen_2_10, -1)(q, q, q, cu, 3, -1)
    assert calls == [("2.11", torch.int32, 3, (3, 0)), ("2.11", torch.int32, 3, (-1, 0)),
                     ("2.10", torch.int32, 3, True)]
    assert kernels.varlen_caller(varlen_2_10, 3) is None, "no sliding window on torch 2.10: sdpa_packed"
    from torch.nn.attention.varlen import varlen_attn  # the installed torch's: a sliding window is supported

    assert kernels.varlen_caller(varlen_attn, 3) is not None


def test_triton_kernels_take_cpu_tensors_only_when_asked(monkeypatch):
    """HNET_TRITON_ON_CPU=1 (for Triton's interpreter, tests/model/triton_interpreter.py) opens
    the one Triton kernel, the SSD scan, to CPU tensors, and says so; the CUDA C++ kernels stay
    CUDA only, and HNET_DISABLE_FUSED still wins."""
    import torch

    t = torch.zeros(1)
    monkeypatch.delenv("HNET_DISABLE_FUSED", raising=False)
    monkeypatch.delenv("HNET_TRITON_ON_CPU", raising=False)
    assert kernels.mamba_chunk_scan(t) is None
    monkeypatch.setenv("HNET_TRITON_ON_CPU", "1")
    st = kernels.status("cpu")
    assert st["mamba_ssm"].startswith(("active (Triton interpreter on CPU", "inactive: import failed")), st
    assert all(v.startswith("inactive: tensors on cpu") for k, v in st.items() if k != "mamba_ssm"), st
    assert kernels.causal_conv1d(t) is None and kernels.flash_varlen_attention(t.half()) is None
    assert kernels.torch_varlen_attention(t.half()) is None
    kernels.check_required("cpu", True)
    monkeypatch.setenv("HNET_DISABLE_FUSED", "1")
    assert kernels.mamba_chunk_scan(t) is None
    assert kernels.status("cpu")["mamba_ssm"] == "inactive: HNET_DISABLE_FUSED=1"


def test_varlen_attn_is_reported_inactive_where_flash_attn_is_used(monkeypatch):
    # attention.py takes flash-attn first; the status must not call torch's varlen_attn active
    # then (flash-attn cannot be installed here: a module stand-in for the import)
    import types

    monkeypatch.delenv("HNET_DISABLE_FUSED", raising=False)
    real = kernels._module
    monkeypatch.setattr(kernels, "_module", lambda name: types.ModuleType(name) if name == "flash_attn" else real(name))
    st = kernels.status("cuda")
    assert st["flash_attn"] == "active"
    assert st["torch_varlen_attn"] == "inactive: flash_attn is installed and is used first"


def test_versions_of_packages_loaded_from_sources_say_so(monkeypatch, tmp_path):
    import sys
    import types

    from importlib import metadata

    from pretrain.tracking import package_versions

    try:
        metadata.version("causal_conv1d")
        pytest.skip("causal-conv1d is installed here")
    except metadata.PackageNotFoundError:
        pass
    pkg = types.ModuleType("causal_conv1d")
    pkg.__path__ = [str(tmp_path / "causal_conv1d")]
    monkeypatch.setitem(sys.modules, "causal_conv1d", pkg)
    assert package_versions()["causal_conv1d"] == f"sources at {tmp_path / 'causal_conv1d'}"
    monkeypatch.delitem(sys.modules, "causal_conv1d")
    assert package_versions()["causal_conv1d"] == "absent"


def test_flash_attention_paths_only_for_the_head_sizes_flash_attention_takes(monkeypatch):
    """On an H200, torch's varlen_attn refused a tiny model's 12-wide heads under bf16 autocast
    ("head_size must be a multiple of 8"): FlashAttention (torch's or flash-attn's) takes fp16/bf16
    heads of a multiple of 8 up to 256, the rest go to sdpa_packed. The device is a stand-in (there
    is no CUDA tensor here), the installed torch's varlen_attn the real one."""
    import types

    import torch

    monkeypatch.setattr(kernels, "_fused_allowed", lambda t: True)  # as for a CUDA tensor
    real = kernels._module
    for flash_installed in (False, True):
        fake_flash = types.SimpleNamespace(flash_attn_varlen_qkvpacked_func=lambda *a, **k: None)
        monkeypatch.setattr(kernels, "_module", lambda name: fake_flash if name == "flash_attn" and flash_installed
                            else (None if name == "flash_attn" else real(name)))
        pick = kernels.flash_varlen_attention if flash_installed else kernels.torch_varlen_attention
        for head_dim, taken in ((64, True), (128, True), (256, True), (12, False), (4, False), (320, False)):
            q = torch.zeros(3, 2, head_dim, dtype=torch.bfloat16)
            assert (pick(q) is not None) == taken, (flash_installed, head_dim)
        assert pick(torch.zeros(3, 2, 64)) is None, "fp32 heads: sdpa_packed"
