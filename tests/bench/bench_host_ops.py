"""Host operations of one training step on the GPU path's shape, counted on CPU.

On an H200 the H-Net steps were bound by the host (scripts/gpu_results/README.md): the GPU sat
idle while Python and the dispatcher queued small kernels. Each ATen operation costs the host a
dispatch there, and most launch a kernel, so the number of operations a step dispatches is a figure this CPU can
measure for the GPU path, and one that code changes move exactly (it does not drift like time).

What runs: parallel.step.PlainStep (the trainer's plain executor, bf16 autocast, foreach AdamW,
gradient clipping) for one micro-batch, on a narrow model with a public layout (the L configs'
layer structure, small widths: the counts depend on the layers, hardly on their width). The
fused path is mamba_ssm's Triton kernels run by Triton's interpreter (the same Python wrappers
and launches as on a GPU; tests/model/triton_interpreter.py); attention, which on a GPU is
FlashAttention (one operation forward, one backward), is a stand-in of that cost, as is the
fused causal conv (`--conv fused`) and torch's fused RMSNorm kernel on CUDA (`--norm fused`).
Printed: the ATen operations of the step (forward, backward and optimizer), the Triton launches,
the forward's operations per module class and the backward's per autograd node.

    python tests/bench/bench_host_ops.py --layout 1stage_L [--bytes 1024] [--conv fused|pure] [--norm fused|pure]
        [--json F, default bench-results/host_ops_LAYOUT.json]
    python tests/bench/bench_host_ops.py --ema 200,1640,2730   # the dechunking EMA alone, fused and pure
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.model import triton_interpreter  # noqa: E402

LAYOUTS = {  # the public L configs' layer structure at narrow widths
    "1stage_L": dict(arch_layout=["m4", ["T22"], "m4"], d_model=[64, 96], d_intermediate=[0, 256],
                     attn_cfg=dict(num_heads=[4, 4], rotary_emb_dim=[8, 8], window_size=[1023, -1])),
    "2stage_L": dict(arch_layout=["m4", ["T1m4", ["T26"], "m4T1"], "m4"], d_model=[64, 96, 128],
                     d_intermediate=[0, 256, 384],
                     attn_cfg=dict(num_heads=[4, 4, 4], rotary_emb_dim=[8, 8, 8], window_size=[1023, 1023, -1])),
}
SSM = dict(d_state=16, headdim=32, chunk_size=64, expand=2, d_conv=4)


class _FlashStandIn:
    """One operation forward and one backward, as FlashAttention's varlen kernels: the count of a
    GPU's attention without running it (its numbers are not attention's)."""

    def __init__(self, torch):
        class Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v):
                return q.clone()

            @staticmethod
            def backward(ctx, g):
                return g, g, g  # dq, dk, dv (one kernel on a GPU)

        self.fn = Fn

    def __call__(self, q, k, v, cu_seqlens, max_seqlen, window):
        return self.fn.apply(q, k, v)


@contextlib.contextmanager
def kernel_launches_apart():
    """A list that is non-empty while Triton's interpreter runs a kernel: the interpreter's own
    copies of a kernel's arguments are no operations of the GPU path, so the counts skip them."""
    from triton.runtime import interpreter

    launch, in_launch = interpreter.InterpretedFunction.run, []

    def marked_launch(self, *args, **kwargs):
        in_launch.append(1)
        try:
            return launch(self, *args, **kwargs)
        finally:
            in_launch.pop()

    interpreter.InterpretedFunction.run = marked_launch
    try:
        yield in_launch
    finally:
        interpreter.InterpretedFunction.run = launch


def count_ema(lengths: list[int], width: int = 64) -> list[dict]:
    """The ATen operations and Triton launches of the dechunking EMA's forward and backward
    (pretrain.model.dynamic_chunking.ema) at chunk sequences of these lengths, on the fused scan
    and on the pure one."""
    triton_interpreter.enable()
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from pretrain.model.dynamic_chunking import ema
    from pretrain.model.ssd import ema_scan

    n = collections.Counter()

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not in_launch:
                n["ops"] += 1
            return func(*args, **(kwargs or {}))

    rows = []
    with kernel_launches_apart() as in_launch:
        for m in lengths:
            seq_idx = torch.zeros(1, m, dtype=torch.int32)
            for path, fn in (("fused", ema), ("pure", ema_scan)):
                h = torch.randn(1, m, width, requires_grad=True)
                p = (torch.rand(1, m) * 0.9 + 0.05).requires_grad_(True)
                n.clear()
                triton_interpreter.LAUNCHES.clear()
                with Count():
                    y = fn(h, p, seq_idx)
                    forward = n["ops"]
                    y.backward(torch.ones_like(y))
                rows.append({"length": m, "path": path, "forward_ops": forward, "forward_and_backward_ops": n["ops"],
                             "triton_launches": sum(triton_interpreter.LAUNCHES.values())})
    return rows


def count_step(layout: str, n_bytes: int, conv: str = "fused", norm: str = "fused") -> dict:
    triton_interpreter.enable()
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from data_pipeline.packer import Piece, pack_row
    from parallel.step import PlainStep
    from pretrain.model import HNetConfig, HNetForCausalLM, kernels
    from scripts.gpu_check import text_documents
    from tests.model.test_host_syncs import _Step

    flash = _FlashStandIn(torch)
    kernels.flash_varlen_attention = lambda t: None
    kernels.torch_varlen_attention = lambda t, window=-1: flash
    if conv == "fused":
        class ConvStandIn(torch.autograd.Function):  # causal_conv1d: one kernel forward, one backward
            @staticmethod
            def forward(ctx, x, weight, bias):
                ctx.weight_bias = weight, bias
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                weight, bias = ctx.weight_bias
                return g, weight.new_zeros(weight.shape), bias.new_zeros(bias.shape)

        kernels.causal_conv1d = lambda t: (lambda x, weight, bias, seq_idx=None, activation=None:
                                           ConvStandIn.apply(x, weight, bias))

    if norm == "fused":
        from pretrain.model import norm as norm_module

        class NormStandIn(torch.autograd.Function):  # torch's _fused_rms_norm on CUDA: one kernel each way
            @staticmethod
            def forward(ctx, x, weight):
                ctx.weight = weight
                return x.clone()

            @staticmethod
            def backward(ctx, g):
                w = ctx.weight
                return g, (w.new_zeros(w.shape) if w is not None else None)

        F = norm_module.F
        norm_module.F = type("F", (), {"silu": staticmethod(F.silu), "rms_norm": staticmethod(
            lambda x, shape, weight=None, eps=None: NormStandIn.apply(x, weight))})

    cfg = HNetConfig.from_dict(dict(LAYOUTS[layout], vocab_size=256, ssm_cfg=SSM, tie_embeddings=False))
    torch.manual_seed(0)
    model = HNetForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ex = PlainStep(model, opt, n_stages=cfg.num_stages, grad_clip=1.0, autocast_dtype=torch.bfloat16)
    docs = text_documents(n_bytes // 512 * 511, 511)  # documents of 512 positions (BOS + 511 bytes)
    batch = _Step([pack_row([Piece(f"t:{j}", d) for j, d in enumerate(docs)], capacity=n_bytes)])
    ex.train_step(batch)  # warm-up: lazily built state (optimizer moments) out of the count

    stack: list[str] = []
    forward_ops: collections.Counter = collections.Counter()
    totals = collections.Counter()
    backward_ops: collections.Counter = collections.Counter()  # by the autograd node that ran them

    def pre(mod, args):
        stack.append(type(mod).__name__)

    def post(mod, args, out):
        stack.pop()

    hooks = [m.register_forward_pre_hook(pre) for m in model.modules()]
    hooks += [m.register_forward_hook(post) for m in model.modules()]

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if in_launch:
                pass
            elif stack:
                forward_ops[stack[-1]] += 1
                totals["forward"] += 1
            else:
                totals["backward_and_optimizer"] += 1
                node = torch._C._current_autograd_node()
                backward_ops[node.name() if node is not None else "(optimizer, clipping, statistics)"] += 1
            return func(*args, **(kwargs or {}))

    triton_interpreter.LAUNCHES.clear()
    with kernel_launches_apart() as in_launch, Count():
        res = ex.train_step(batch)
    for h in hooks:
        h.remove()
    instances = collections.Counter(type(m).__name__ for m in model.modules())
    return {"layout": layout, "bytes": int(batch.global_bytes), "conv": conv, "norm": norm, "loss": res.loss,
            "aten_ops": totals["forward"] + totals["backward_and_optimizer"], **totals,
            "triton_launches": sum(triton_interpreter.LAUNCHES.values()),
            "triton_launches_by_kernel": dict(triton_interpreter.LAUNCHES.most_common()),
            "forward_ops_per_module_class": {k: {"ops": v, "instances": instances[k]}
                                             for k, v in forward_ops.most_common()},
            "backward_ops_by_autograd_node": dict(backward_ops.most_common(25))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layout", choices=sorted(LAYOUTS), default="1stage_L")
    ap.add_argument("--bytes", type=int, default=1024)
    ap.add_argument("--conv", choices=["pure", "fused"], default="fused",
                    help="the causal conv: fused (causal_conv1d's cost, a stand-in) or the pure-PyTorch path")
    ap.add_argument("--norm", choices=["pure", "fused"], default="fused",
                    help="the RMSNorms: fused (CUDA's one-kernel F.rms_norm, a stand-in) or as torch runs them on CPU")
    ap.add_argument("--ema", metavar="M,M,...",
                    help="instead: the dechunking EMA alone, fused and pure, at these chunk-sequence lengths")
    ap.add_argument("--json", help="where to write the figures (default bench-results/host_ops_LAYOUT.json, "
                                   "or host_ops_ema.json)")
    a = ap.parse_args()
    if a.ema:
        r, name = count_ema([int(m) for m in a.ema.split(",")]), "ema"
    else:
        r, name = count_step(a.layout, a.bytes, a.conv, a.norm), a.layout
    print(json.dumps(r, indent=1))
    out = Path(a.json) if a.json else ROOT / "bench-results" / f"host_ops_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
