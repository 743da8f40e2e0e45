"""How many Triton compilations the Mamba-2 scan of an inner level needs over a whole run, found on CPU.

Triton compiles a kernel anew for every new *specialisation* of its arguments: each integer is
marked as equal to 1 or divisible by 16 (or neither), each tensor pointer as 16-byte aligned or
not, and the compiled binary is cached under that key (triton/runtime/jit.py,
`create_function_from_signature`; the rules in triton/backends/compiler.py). An H-Net's inner
levels have a length that changes at every micro-batch (the number of chunks the router chose), so
the question for a GPU run is how many keys those lengths reach, and how early: every new key costs
a compilation (about a second on a GPU) inside a training step.

This probe answers it without a GPU and without running a kernel: it calls mamba_ssm's
`mamba_chunk_scan_combined` forward and backward with tensors of one level's real widths and
strides (built as `pretrain/model/mamba2.py` builds them, from the split in_proj output and the
conv output) for every length in a range (1..8192 by default), with Triton's interpreter launching nothing (the outputs are
left unwritten; only the arguments are read), and computes each launch's key with Triton's own
specialisation function. Printed: for each kernel, the number of distinct keys over all lengths,
and the lengths at which the distinct argument specialisations first appear.

    python tests/bench/bench_triton_specializations.py [--config tests/fixtures/hnet_2stage_L.json]
        [--stage 1] [--min-length 1] [--max-length 8192] [--dtype bf16]
        [--json F, default bench-results/triton_specializations.json]
"""
from __future__ import annotations

import argparse
import collections
import inspect
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.model import triton_interpreter  # noqa: E402


def _is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    return "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann)))


def probe(config_path: str, stage: int, min_length: int, max_length: int, dtype_name: str) -> dict:
    triton_interpreter.enable()
    import torch
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend
    from triton.runtime import interpreter

    from pretrain.model import HNetConfig, kernels
    from pretrain.model.mamba2 import Mamba2

    cfg = HNetConfig.from_dict(json.loads(Path(config_path).read_text()))
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    with torch.device("meta"):  # only the widths: nothing of this size is allocated
        s = cfg.ssm_cfg
        m = Mamba2(cfg.d_model[stage], d_state=s.d_state, d_conv=s.d_conv, expand=s.expand,
                   headdim=s.headdim, ngroups=s.ngroups, chunk_size=s.chunk_size)
    widths = dict(d_model=m.d_model, d_inner=m.d_inner, nheads=m.nheads, headdim=m.headdim,
                  d_state=m.d_state, ngroups=m.ngroups, chunk_size=m.chunk_size)
    in_proj_width = 2 * m.d_inner + 2 * m.ngroups * m.d_state + m.nheads

    keys: dict[str, dict[tuple, int]] = collections.defaultdict(dict)  # kernel -> key -> first length
    length = [0]

    def record_only(self, *args, grid, warmup, **kwargs):
        params = inspect.signature(self.fn).parameters
        bound = dict(zip(self.arg_names, args), **{k: v for k, v in kwargs.items() if k in params})
        key = []
        for name, p in params.items():
            if name not in bound:
                continue  # a default: the same at every call
            v = bound[name]
            key.append((name, ("constexpr", v) if _is_constexpr(p)
                        else native_specialize_impl(BaseBackend, v, False, True, True)))
        keys[self.fn.__name__].setdefault(tuple(key), length[0])

    launch = interpreter.InterpretedFunction.run
    interpreter.InterpretedFunction.run = record_only
    scan = kernels.mamba_chunk_scan(torch.empty(1))
    try:
        A = -torch.ones(m.nheads)
        D, dt_bias = torch.ones(m.nheads), torch.zeros(m.nheads)
        for L in range(min_length, max_length + 1):
            length[0] = L
            # what Mamba2.forward hands the scan: dt a view of the in_proj output, x/B/C views of
            # the (contiguous) conv output, seq_idx one int32 row
            zxbcdt = torch.zeros(1, L, in_proj_width, dtype=dtype)
            dt = zxbcdt[..., in_proj_width - m.nheads:]
            xBC = torch.zeros(1, L, m.conv_dim, dtype=dtype)
            x, B, C = torch.split(xBC, [m.d_inner, m.ngroups * m.d_state, m.ngroups * m.d_state], dim=-1)
            x = x.reshape(1, L, m.nheads, m.headdim)
            B = B.reshape(1, L, m.ngroups, m.d_state)
            C = C.reshape(1, L, m.ngroups, m.d_state)
            # leaves for the backward; detach keeps each view's strides and storage offset
            x_, dt_, B_, C_ = (t.detach().requires_grad_() for t in (x, dt, B, C))
            seq_idx = torch.zeros(1, L, dtype=torch.int32)
            y = scan(x_, dt_, A, B_, C_, chunk_size=m.chunk_size, D=D, z=None, dt_bias=dt_bias,
                     dt_softplus=True, seq_idx=seq_idx)
            y.backward(torch.zeros_like(y))
    finally:
        interpreter.InterpretedFunction.run = launch

    per_kernel = {}
    for name, ks in sorted(keys.items()):
        firsts = sorted(ks.values())
        per_kernel[name] = {"distinct_keys": len(ks), "first_seen_at_lengths": firsts}
    return {"config": config_path, "stage": stage, "dtype": dtype_name, "widths": widths,
            "lengths": [min_length, max_length], "kernels": per_kernel,
            "compilations_over_all_lengths": sum(len(ks) for ks in keys.values())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(ROOT / "tests/fixtures/hnet_2stage_L.json"))
    ap.add_argument("--stage", type=int, default=1, help="the level whose Mamba layers to probe")
    ap.add_argument("--min-length", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=8192)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--json", help="where to write the figures (default bench-results/triton_specializations.json)")
    a = ap.parse_args()
    r = probe(a.config, a.stage, a.min_length, a.max_length, a.dtype)
    print(json.dumps(r, indent=1))
    out = Path(a.json) if a.json else ROOT / "bench-results" / "triton_specializations.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
