"""GPU checks: fused kernels vs the pure-PyTorch path, and throughput. Run on a CUDA machine:

    python scripts/gpu_check.py --out gpu_check.json [--mamba-src DIR]

--mamba-src points at an unpacked mamba_ssm source tree whose Triton SSD kernels are loaded
without the package's compiled extension (so the check runs where mamba-ssm cannot be built).
Writes a JSON report; exits non-zero if an equivalence check fails its tolerance.

    python scripts/gpu_check.py --device cpu [--triton-interpreter] --out report.json

checks the script itself on a CPU: the throughput code on the tiny config and, with
--triton-interpreter, the SSD and model comparisons on small sizes through mamba-ssm's Triton
kernels under Triton's interpreter (tests/model/triton_interpreter.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load_mamba_triton(src: str | None) -> None:
    if not src:
        return
    pkg = types.ModuleType("mamba_ssm")  # skip mamba_ssm/__init__.py: it imports the CUDA extension
    pkg.__path__ = [str(Path(src).resolve())]
    sys.modules["mamba_ssm"] = pkg


def tile_cost(config) -> int:
    """Shared memory a Triton config asks for, up to a constant: its tile (the product of its
    BLOCK_SIZE_* values) times its pipeline stages."""
    size = 1
    for name, value in config.kwargs.items():
        if name.startswith("BLOCK_SIZE_"):
            size *= value
    return size * (config.num_stages or 1)


def smallest_tiles():
    """Each of mamba_ssm's autotuned SSD kernels keeps only its configuration of least shared
    memory, so that a process compiles one variant per kernel instead of benchmarking all of them
    (about 120 compilations per dtype and shape key in the forward and backward together; minutes
    of a short GPU lease). What a kernel computes does not depend on its tiles: the equivalence
    checks and the trainer check run this way, the throughput rows with full autotuning.
    Returns (number of kernels limited, a function that gives every kernel its full list back and
    forgets what it had chosen); (0, no-op) where mamba_ssm's Triton kernels are not importable."""
    import importlib

    try:
        from triton.runtime.autotuner import Autotuner

        modules = [importlib.import_module(f"mamba_ssm.ops.triton.{m}")
                   for m in ("ssd_bmm", "ssd_chunk_state", "ssd_state_passing", "ssd_chunk_scan", "ssd_combined")]
    except Exception:  # noqa: BLE001 - no Triton or no mamba_ssm: nothing is autotuned
        return 0, lambda: None
    saved, seen = [], set()
    for module in modules:
        for obj in vars(module).values():
            if isinstance(obj, Autotuner) and len(obj.configs) > 1 and id(obj) not in seen:
                seen.add(id(obj))
                saved.append((obj, obj.configs))
                obj.configs = [min(obj.configs, key=tile_cost)]
                obj.cache.clear()

    def restore():
        for obj, configs in saved:
            obj.configs = configs
            obj.cache.clear()

    return len(saved), restore


def rel_err(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1e-12))


def check_ssd(torch, device, report, small: bool = False):
    """mamba_ssm's chunked scan against ssd_scan on packed documents, forward and gradients, in
    fp32 and bf16 (`small`: short sizes, for Triton's interpreter on a CPU)."""
    from pretrain.model.ssd import ssd_scan

    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception as e:  # noqa: BLE001
        report["ssd"] = {"skipped": f"mamba_ssm Triton SSD not importable: {e!r}"}
        return True
    torch.manual_seed(0)
    b, L, h, p, n = (1, 192, 2, 16, 16) if small else (2, 4096, 16, 64, 128)
    lengths = [50, 1, 77, 64] if small else [1000, 1, 2047, 1048]
    chunk = 32 if small else 256
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).int()
    seq = seq.unsqueeze(0).expand(b, -1).contiguous().to(device)
    out = {}
    ok = True
    for dtype, tol in ((torch.float32, 2e-3), (torch.bfloat16, 3e-2)):
        x = torch.randn(b, L, h, p, device=device, dtype=dtype, requires_grad=True)
        dt_raw = (torch.randn(b, L, h, device=device) * 0.5 - 2).to(dtype).requires_grad_(True)
        dt_bias = torch.randn(h, device=device) * 0.1
        A = -torch.rand(h, device=device) * 4 - 0.5
        B = torch.randn(b, L, 1, n, device=device, dtype=dtype, requires_grad=True)
        C = torch.randn(b, L, 1, n, device=device, dtype=dtype, requires_grad=True)
        D = torch.randn(h, device=device)
        y_fused = mamba_chunk_scan_combined(x, dt_raw, A, B, C, chunk_size=chunk, D=D, dt_bias=dt_bias,
                                            dt_softplus=True, seq_idx=seq)
        dt = torch.nn.functional.softplus(dt_raw.float() + dt_bias)
        y_pure = ssd_scan(x, dt, A, B, C, chunk, seq) + x * D.to(dtype).unsqueeze(-1)
        g = torch.randn_like(y_fused)
        grads_fused = torch.autograd.grad(y_fused, (x, dt_raw, B, C), g)
        grads_pure = torch.autograd.grad(y_pure, (x, dt_raw, B, C), g)
        res = {"forward_rel_err": rel_err(y_pure, y_fused)}
        for name, gf, gp in zip(("x", "dt", "B", "C"), grads_fused, grads_pure):
            res[f"grad_{name}_rel_err"] = rel_err(gp, gf)
        res["tolerance"] = tol
        res["pass"] = all(v <= tol for k, v in res.items() if k.endswith("rel_err"))
        ok &= res["pass"]
        out[str(dtype)] = res
    report["ssd"] = out
    return ok


def check_model(torch, device, report, small: bool = False):
    """The tiny 1- and 2-stage models' logits on packed documents: fused vs pure path on the
    device, and the device's pure path vs the CPU's (`small`: shorter documents)."""
    from tests.model.conftest import tiny_model

    out, ok = {}, True
    for stages in (1, 2):
        # Triton's tl.dot needs dims of at least 16: widen the SSM heads and state of the tiny model
        model = tiny_model(stages, ssm_cfg=dict(d_state=32, headdim=32, chunk_size=64, d_conv=4, expand=2)).to(device)
        torch.manual_seed(1)
        lengths = [100, 1, 60, 23] if small else [300, 1, 700, 23]
        ids = torch.randint(0, 256, (1, sum(lengths)), device=device)
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
        with torch.no_grad():
            fused = model(ids, cu_seqlens=cu).logits
            os.environ["HNET_DISABLE_FUSED"] = "1"
            pure = model(ids, cu_seqlens=cu).logits
            os.environ.pop("HNET_DISABLE_FUSED")
            cpu = model.cpu()(ids.cpu(), cu_seqlens=cu.cpu()).logits
        res = {"fused_vs_pure_rel_err": rel_err(fused, pure), "gpu_vs_cpu_rel_err": rel_err(pure.cpu(), cpu)}
        res["pass"] = res["fused_vs_pure_rel_err"] < 1e-3 and res["gpu_vs_cpu_rel_err"] < 1e-3
        ok &= res["pass"]
        out[f"{stages}-stage"] = res
    report["model"] = out
    return ok


def check_norms(torch, device, report):
    """RMSNorm and GatedRMSNorm (pretrain/model/norm.py, through F.rms_norm) on the device against
    the formula written out, forward and gradients, fp32 and bf16; and the ATen operations one
    forward and backward dispatch: on CUDA, torch's fused kernel (`_fused_rms_norm` and its
    backward) instead of the composite's six small operations and their backward."""
    import torch.nn.functional as F
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.model.norm import GatedRMSNorm, RMSNorm

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    def written_out(g, weight, group_size, eps):
        shape = g.shape
        g = g.reshape(*shape[:-1], shape[-1] // group_size, group_size)
        g = g * torch.rsqrt(g.pow(2).mean(-1, keepdim=True) + eps)
        return g.reshape(shape) * weight.float()

    out, ok = {}, True
    d = 256
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 1e-2)):
        torch.manual_seed(0)
        norm, gated = RMSNorm(d).to(device), GatedRMSNorm(d, group_size=d // 4).to(device)
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            gated.weight.uniform_(0.5, 1.5)
        x, z = (torch.randn(1, 1000, d, device=device).to(dtype).requires_grad_() for _ in range(2))
        res = {}
        for name, mod, call, ref in (
                ("rmsnorm", norm, lambda: norm(x), lambda: written_out(x.float(), norm.weight, d, norm.eps)),
                ("gated_4_groups", gated, lambda: gated(x, z),
                 lambda: written_out(x.float() * F.silu(z.float()), gated.weight, d // 4, gated.eps))):
            inputs = (x, z, mod.weight) if mod is gated else (x, mod.weight)
            names = Names()
            with names:
                y = call()
                g = torch.randn_like(y)
                grads = torch.autograd.grad(y, inputs, g)
            y_ref = ref().to(dtype)
            grads_ref = torch.autograd.grad(y_ref, inputs, g)
            err = max([rel_err(y, y_ref)] + [rel_err(a, b) for a, b in zip(grads, grads_ref)])
            res[name] = {"max_rel_err": err, "fused_kernel": any("fused_rms_norm" in n for n in names.ops),
                         "aten_ops_fwd_bwd": len(names.ops), "pass": err < tol}
            ok &= res[name]["pass"]
        out[str(dtype)] = res
    report["norms"] = out
    return ok


def check_conv(torch, device, report):
    """causal_conv1d's fused kernel (with seq_idx, as the model calls it) against the pure
    causal_conv1d_reset + SiLU on packed documents: forward and the gradients of x, weight and bias,
    in fp32 and bf16. Skipped, with the reason, where causal-conv1d is not installed."""
    from pretrain.model import kernels
    from pretrain.model.mamba2 import causal_conv1d_reset

    b, L, c, k = 2, 4096, 256, 4
    probe = torch.empty(0, device=device)
    fused = kernels.causal_conv1d(probe)
    if fused is None:
        report["conv"] = {"skipped": kernels.status(device).get("causal_conv1d", "not available")}
        return True
    lengths = [1000, 1, 2047, 1048]
    seq = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).int()
    seq = seq.unsqueeze(0).expand(b, -1).contiguous().to(device)
    out, ok = {}, True
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        x = torch.randn(b, L, c, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(c, 1, k, device=device) * 0.3).to(dtype).requires_grad_(True)
        bias = (torch.randn(c, device=device) * 0.1).to(dtype).requires_grad_(True)
        y_fused = fused(x.transpose(1, 2), w.squeeze(1), bias, seq_idx=seq, activation="silu").transpose(1, 2)
        y_pure = torch.nn.functional.silu(causal_conv1d_reset(x.float(), w.float(), bias.float(), seq)).to(dtype)
        g = torch.randn_like(y_fused)
        gf = torch.autograd.grad(y_fused, (x, w, bias), g)
        gp = torch.autograd.grad(y_pure, (x, w, bias), g)
        res = {"forward_rel_err": rel_err(y_fused, y_pure),
               **{f"grad_{n}_rel_err": rel_err(a, b_) for n, a, b_ in zip(("x", "weight", "bias"), gf, gp)}}
        res["tolerance"] = tol
        res["pass"] = all(v <= tol for key, v in res.items() if key.endswith("rel_err"))
        ok &= res["pass"]
        out[str(dtype)] = res
    report["conv"] = out
    return ok


def text_documents(n_bytes: int, doc_len: int) -> list[bytes]:
    """Real text for the throughput rows (an untrained router chunks random bytes unlike text):
    Python's own standard library sources, cut into documents of doc_len bytes."""
    root = Path(json.__file__).parents[1]  # json is a package of the standard library
    data = bytearray()
    for f in sorted(root.glob("*.py")):
        data += f.read_bytes()
        if len(data) >= n_bytes:
            break
    data = bytes(data) * (n_bytes // max(1, len(data)) + 1)
    return [data[i:i + doc_len] for i in range(0, n_bytes, doc_len)]


THROUGHPUT_CONFIGS = {  # name -> model config (a bench dict or a public-style JSON fixture)
    "tiny": "bench:tiny", "small": "bench:small", "hnet_1stage_L": "tests/fixtures/hnet_1stage_L.json",
    "hnet_2stage_L": "tests/fixtures/hnet_2stage_L.json",
}


def throughput(torch, device, report, budget_s: float = 240.0, configs=None, micro_batches: int = 4,
               row_bytes: int = 8192, doc_len: int = 2048, reps: int = 5, save=lambda: None):
    """Training steps as the trainer takes them (parallel.step.PlainStep: fp32 parameters, bf16
    autocast on CUDA, fused AdamW, gradient clipping) on packed 8 KB rows of text: bytes/s and
    MFU of each H-Net config (small also on the pure-PyTorch path) and of a FLOP-matched
    isotropic Transformer, with the share of the step the GPU was busy (the rest: host syncs,
    launches, Python). The L configs run first; what comes after `budget_s` is spent is skipped."""
    from data_pipeline.packer import Piece, pack_row
    from pretrain.metrics import peak_tflops
    from pretrain.model import HNetConfig
    from tests.bench.bench_model import CONFIGS, isotropic_match
    from tests.model.test_host_syncs import _Step

    cuda = device == "cuda"
    precision = "bf16" if cuda else "fp32"
    peak, peak_source = peak_tflops(torch.cuda.get_device_name(0), precision) if cuda else (0.0, "cpu: no MFU")
    per_row = max(1, row_bytes // doc_len)  # documents of doc_len positions (BOS + bytes) fill a row
    docs = text_documents(micro_batches * per_row * (doc_len - 1), doc_len - 1)
    rows = [pack_row([Piece(f"t:{i}-{j}", docs[i * per_row + j]) for j in range(per_row)], capacity=row_bytes)
            for i in range(micro_batches)]
    batch = _Step(rows)
    out = {"precision": precision, "peak_tflops": peak, "peak_source": peak_source,
           "step_bytes": int(batch.global_bytes), "micro_batches": micro_batches}
    report["throughput_train_step"] = out
    t_start = time.perf_counter()
    # the L configs first: they are what the figures are for; the budget drops what comes last
    for name in configs or ["hnet_1stage_L", "hnet_2stage_L", "small"]:
        spec = THROUGHPUT_CONFIGS.get(name, name)
        config = (HNetConfig.from_dict(CONFIGS[spec[len("bench:"):]]) if spec.startswith("bench:")
                  else HNetConfig.from_json(ROOT / spec))
        variants = [("hnet", config, False)]
        if cuda and name == "small":  # the pure-PyTorch path beside the fused kernels, on the smallest
            variants.append(("hnet_pure", config, True))
        variants.append(("isotropic_transformer", isotropic_match(config, config.ratio_targets, doc_len), False))
        for label, cfg, pure in variants:
            key = f"{name}/{label}"
            if time.perf_counter() - t_start > budget_s:
                out[key] = {"skipped": f"time budget of {budget_s:.0f} s spent"}
                continue
            if pure:
                os.environ["HNET_DISABLE_FUSED"] = "1"
            try:
                out[key] = _time_steps(torch, device, cfg, batch, peak, reps, doc_len)
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: report it, go on with the next
                out[key] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            finally:
                os.environ.pop("HNET_DISABLE_FUSED", None)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            save()
        h, t = out.get(f"{name}/hnet", {}), out.get(f"{name}/isotropic_transformer", {})
        if "bytes_per_s" in h and "bytes_per_s" in t:
            out[f"{name}/time_per_byte_hnet_over_isotropic"] = t["bytes_per_s"] / h["bytes_per_s"]
        save()


class TritonCompiles:
    """Counts Triton's JIT compilations and their seconds (Triton's jit_cache_hook runs before one,
    jit_post_compile_hook after). A kernel is compiled anew for every new specialisation of its
    integer arguments (== 1, divisible by 16): dynamic chunking changes the inner levels' lengths
    at every step, so a new length class costs seconds of compilation in the middle of training
    until each has been seen. Inactive (counts nothing) where Triton has no such hooks."""

    def __init__(self):
        self.count, self.seconds, self._t0 = 0, 0.0, None
        try:
            from triton import knobs

            self._runtime = knobs.runtime
            self._runtime.jit_cache_hook, self._runtime.jit_post_compile_hook = self._before, self._after
            self.active = True
        except Exception:  # noqa: BLE001 - no Triton, or one without knobs
            self.active = False

    def _before(self, *args, **kwargs):
        self._t0 = time.perf_counter()
        return False  # True would skip the compilation

    def _after(self, *args, **kwargs):
        self.count += 1
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
        return False

    def close(self):
        if self.active:
            self._runtime.jit_cache_hook = self._runtime.jit_post_compile_hook = None


def aten_ops(torch, fn) -> int:
    """The ATen operations `fn` dispatches (forward, backward and optimizer: each one a kernel
    launch or more on a GPU, each with its host-side dispatch cost); Triton's own launches are not
    among them. Against the step's host time (1 - gpu_busy_share of it) it says whether the host
    is bound by the number of operations."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def _time_steps(torch, device, cfg, batch, peak, reps, doc_len):
    from parallel.step import PlainStep
    from pretrain.model import HNetForCausalLM, flops_per_byte, stage_compression

    cuda = device == "cuda"
    torch.manual_seed(0)
    model = HNetForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    ex = PlainStep(model, opt, n_stages=cfg.num_stages, grad_clip=1.0, device=device,
                   autocast_dtype=torch.bfloat16 if cuda else None)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    compiles = TritonCompiles()
    try:
        t = time.perf_counter()
        for _ in range(2):  # warm-up: kernel autotuning, allocator
            res = ex.train_step(batch)
        sync()
        warmup_s, warmup_compiles = time.perf_counter() - t, compiles.count
        # Each step timed on its own, with the compilations it did: a step that compiled a kernel
        # for a new length class is not a steady-state step (the steady figure leaves those out)
        steps = []
        for _ in range(reps):
            before_n, before_s = compiles.count, compiles.seconds
            t = time.perf_counter()
            res = ex.train_step(batch)
            sync()
            steps.append((time.perf_counter() - t, compiles.count - before_n, compiles.seconds - before_s))
    finally:
        compiles.close()
    steady = [s for s, n, _ in steps if n == 0]
    dt = statistics.median(steady or [s for s, _, _ in steps])
    bps = batch.global_bytes / dt
    ratios = stage_compression(list(res.compression)) if cfg.num_stages else []
    fpb = flops_per_byte(cfg, ratios, doc_len)
    r = {"params": sum(p.numel() for p in model.parameters()), "layout": json.dumps(cfg.arch_layout),
         "step_s": dt,  # the median of the timed steps that compiled nothing (of all, where each did)
         "timed_steps": [{"s": round(a, 4), "triton_compiles": n, "compile_s": round(c, 2)} for a, n, c in steps],
         "steady_steps": len(steady), "warmup_s_2_steps": warmup_s,  # the first two: compilation and autotuning
         "warmup_triton_compiles": warmup_compiles if compiles.active else None,
         "bytes_per_s": bps, "flops_per_byte": fpb, "tflops_per_s": fpb * bps / 1e12,
         "bytes_per_chunk": list(res.compression), "loss": res.loss}
    r["aten_ops_per_step"] = aten_ops(torch, lambda: ex.train_step(batch))
    if peak:
        r["mfu"] = fpb * bps / (peak * 1e12)
    if cuda:
        r["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
        r["gpu_busy_share"], r["kernel_launch_calls_per_step"] = _gpu_busy_share(torch, ex, batch, dt)
    r["host_top_ops"] = _host_top_ops(torch, ex, batch, cuda)
    del ex, opt, model
    return r


def _gpu_busy_share(torch, ex, batch, step_s: float):
    """Share of one step's wall time that the GPU spent in kernels (torch.profiler); the rest is
    the GPU waiting on the host: synchronisations, kernel launches, Python. With it the kernel
    launch calls the profiler saw (None where it recorded no launch API events)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ex.train_step(batch)
        torch.cuda.synchronize()
    events = prof.key_averages()
    busy_us = sum(e.self_device_time_total for e in events)
    launches = [e.count for e in events if "LaunchKernel" in e.key]
    return busy_us / 1e6 / step_s, (sum(launches) if launches else None)


def _host_top_ops(torch, ex, batch, cuda: bool, n: int = 12) -> list:
    """Where one step's host time goes: the operations with the most self CPU time (on a GPU that
    is their dispatch and launch, the kernels run on the device), as [name, calls, ms]."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ex.train_step(batch)
        if cuda:
            torch.cuda.synchronize()
    top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [[e.key, e.count, round(e.self_cpu_time_total / 1e3, 2)] for e in top]


def check_attention(torch, device, report):
    """torch's varlen_attn and flash-attn (where installed) against the masked SDPA path on packed
    documents with a sliding window shorter than the documents: forward and gradients, bf16."""
    from pretrain.model.attention import sdpa_packed
    from pretrain.model.sequence import PackedSeqs

    out, ok = {}, True
    lengths, window, h, d = [700, 1, 1500, 300], 255, 8, 64
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    seqs = PackedSeqs.from_cu_seqlens(cu)
    T = int(cu[-1])
    torch.manual_seed(0)
    q, k, v = (torch.randn(T, h, d, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    ref = sdpa_packed(q.float(), k.float(), v.float(), seqs, window)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    impls = {}
    try:
        from torch.nn.attention.varlen import varlen_attn

        from pretrain.model.kernels import varlen_caller

        attend = varlen_caller(varlen_attn, window)  # the call the model makes
        if attend is None:
            raise RuntimeError("this torch's varlen_attn has no window_size")
        impls["torch_varlen_attn"] = lambda: attend(q, k, v, cu, seqs.max_seqlen, window)
    except Exception as e:  # noqa: BLE001
        out["torch_varlen_attn"] = {"skipped": repr(e)}
    try:
        from flash_attn import flash_attn_varlen_qkvpacked_func as fa

        impls["flash_attn"] = lambda: fa(torch.stack([q, k, v], 1), cu, seqs.max_seqlen, causal=True,
                                         window_size=(window, -1))
    except Exception as e:  # noqa: BLE001
        out["flash_attn"] = {"skipped": repr(e)}
    for name, fn in impls.items():
        y = fn()
        grads = torch.autograd.grad(y, (q, k, v), g.to(y.dtype))
        errs = {"fwd": rel_err(y, ref), **{f"d{n}": rel_err(a, b) for n, a, b in zip("qkv", grads, ref_grads)}}
        passed = all(e < 3e-2 for e in errs.values())
        ok &= passed
        out[name] = {**errs, "ok": passed}
    out["fp32"] = ("not compared: flash-attn and varlen_attn take fp16/bf16 only, so an fp32 model runs "
                   "sdpa_packed itself (pretrain/model/attention.py)")
    report["attention_vs_sdpa_bf16_window255"] = out
    return ok


def check_syncs(torch, device, report):
    """Host-device synchronisations of training micro-batches on the GPU, as CUDA reports them:
    torch.cuda.set_sync_debug_mode("warn") warns at every synchronising call. Per micro-batch =
    (a 3-micro-batch step - a 1-micro-batch step) / 2; the CPU test (tests/model/test_host_syncs.py)
    bounds the same count at one per hierarchy level by wrapping the reading calls."""
    import warnings

    from parallel.step import PlainStep
    from tests.model.conftest import tiny_model
    from tests.model.test_host_syncs import _micro_batch, _Step

    out = {}
    # heads 8 and 16 wide: attention on FlashAttention's path (varlen_attn) as in a real config;
    # the tiny model's 12-wide heads would take sdpa_packed
    heads = {1: dict(num_heads=[2, 6], rotary_emb_dim=[8, 8], window_size=[7, -1]),
             2: dict(num_heads=[2, 2, 6], rotary_emb_dim=[8, 8, 8], window_size=[7, 5, -1])}
    for stages in (1, 2):
        model = tiny_model(stages, ssm_cfg=dict(d_state=32, headdim=32, chunk_size=64, d_conv=4, expand=2),
                           attn_cfg=heads[stages])
        model = model.to(device).train()
        ex = PlainStep(model, torch.optim.AdamW(model.parameters(), lr=1e-3), n_stages=stages, grad_clip=1.0,
                       device=device, autocast_dtype=torch.bfloat16)  # as the trainer steps on a GPU
        counts = {}
        for n in (1, 3, 1, 3):  # the second pair, after warm-up (kernel autotuning may synchronise)
            step = _Step([_micro_batch(i) for i in range(n)])
            torch.cuda.synchronize()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    ex.train_step(step)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            counts[n] = sum("synchroniz" in str(w.message) for w in caught)
        per_micro = (counts[3] - counts[1]) / 2
        # A figure, not a gate: pageable host-to-device copies of the batch may count here too.
        out[f"{stages}-stage"] = {"syncs_1_micro_batch_step": counts[1], "syncs_per_micro_batch": per_micro,
                                  "within_one_per_level": per_micro <= stages}
    report["host_syncs"] = out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="gpu_check.json")
    ap.add_argument("--mamba-src", default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a quick run of the same code on tiny sizes (no kernels "
                                                      "to compare there), to check the script itself")
    ap.add_argument("--triton-interpreter", action="store_true",
                    help="with --device cpu: also the SSD and model comparisons, small, under Triton's interpreter")
    ap.add_argument("--throughput-budget-s", type=float, default=240.0)
    ap.add_argument("--smallest-tiles", action="store_true",
                    help="with --run: each autotuned mamba_ssm kernel compiled in its smallest configuration "
                         "only (the trainer check tests the GPU path, not the kernels' speed)")
    ap.add_argument("--run", nargs=argparse.REMAINDER, default=None, metavar="MODULE ARGS",
                    help="instead of the checks: run python -m MODULE ARGS (pretrain.train, pretrain.sample), "
                         "mamba_ssm's Triton kernels loaded from --mamba-src")
    args = ap.parse_args()
    load_mamba_triton(args.mamba_src)
    if args.run is not None:
        import runpy

        if not args.run:
            ap.error("--run needs a module: --run pretrain.train ARGS")
        if args.smallest_tiles:
            limited, _ = smallest_tiles()
            print(f"[gpu_check] autotuning off: {limited} mamba_ssm kernels in their smallest tiles", flush=True)
        sys.argv = list(args.run)
        runpy.run_module(args.run[0], run_name="__main__", alter_sys=True)
        return
    import torch

    from pretrain.model import kernels

    device = args.device
    if device == "cpu":
        ok = True
        if args.triton_interpreter:
            from tests.model import triton_interpreter

            triton_interpreter.enable()
        report = {"torch": torch.__version__, "device": "cpu", "kernels": kernels.status("cpu")}
        check_conv(torch, device, report)  # causal-conv1d is CUDA only: reports why it is skipped
        ok &= check_norms(torch, device, report)
        if args.triton_interpreter:
            ok &= check_ssd(torch, device, report, small=True)
            ok &= check_model(torch, device, report, small=True)
            report["triton_kernel_launches"] = dict(triton_interpreter.LAUNCHES)
            os.environ.pop("HNET_TRITON_ON_CPU")  # the throughput figures are the CPU path's, as without it
        throughput(torch, device, report, budget_s=args.throughput_budget_s, configs=["tiny"], micro_batches=2,
                   row_bytes=1024, doc_len=256, reps=1)
    else:
        def save():  # the throughput rows as they come: a part cut short by the timeout keeps the earlier ones
            Path(args.out).write_text(json.dumps(report, indent=2))

        report = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                  "fused_available": kernels.available(), "kernels": kernels.status("cuda"),
                  "triton_f32_default": os.environ.get("TRITON_F32_DEFAULT", "(Triton's: tf32)")}
        ok = True
        # The comparisons in true fp32: no TF32 in cuDNN's convolutions (on by default) or cuBLAS's
        # matmuls, and each kernel in one (its smallest) tiling; the throughput rows afterwards run
        # as training does, with every kernel autotuned.
        limited, full_autotuning = smallest_tiles()
        tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        report["comparisons_run_with"] = (f"TF32 off; {limited} autotuned mamba_ssm kernels in their smallest tiles "
                                          "(the throughput rows: TF32 as torch's defaults, full autotuning)")
        # Each part on its own: one that raises (a Triton compile failure, out of memory) is
        # reported and fails the check, the others still run, and the JSON is written after each
        # part, so a part cut short by the caller's timeout leaves the earlier figures.
        for name, fn, gates in (("ssd", check_ssd, True), ("conv", check_conv, True), ("norms", check_norms, True),
                                ("model", check_model, True),
                                ("attention", check_attention, True), ("host_syncs", check_syncs, False),
                                ("throughput", lambda *a: throughput(*a, budget_s=args.throughput_budget_s,
                                                                     save=save), False)):
            if name == "throughput":
                full_autotuning()
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            t0 = time.perf_counter()
            try:
                passed = fn(torch, device, report)
                ok &= bool(passed) or not gates
            except Exception as e:  # noqa: BLE001
                report[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:500]}"
                ok &= not gates
            report.setdefault("seconds", {})[name] = round(time.perf_counter() - t0, 1)
            Path(args.out).write_text(json.dumps(report, indent=2))
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
