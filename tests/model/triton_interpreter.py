"""mamba_ssm's Triton SSD kernels on a CPU, under Triton's interpreter.

Triton's interpreter (TRITON_INTERPRET=1) runs a kernel's program instances with NumPy on host
memory: the same kernel source, launch grid, block shapes and masks as on a GPU, without a GPU.
With it the tests check on this CPU-only machine what the GPU path adds to the model: the call
into `mamba_chunk_scan_combined` (argument layout, `seq_idx` resets between packed documents,
D skip, dt bias and softplus, dtypes and strides) and its backward, inside the model and under
ZeRO-3 training, in fp32 and bf16. What it cannot check is a GPU's: timing, shared memory
limits, the autotuned block sizes' numerics.

`make setup` puts the two things this needs outside .venv (triton would otherwise be imported by
every DeepSpeed start): Triton under .cache/triton and mamba-ssm's Python sources under
.cache/mamba_src (scripts/fetch_mamba_src.py). mamba_ssm's package __init__ imports its compiled
CUDA extension, so the package is registered from its source directory without running it.

Three things in mamba_ssm and Triton assume a CUDA device, and the interpreter gets bfloat16
matrix products wrong; `enable()` mends the four, for the interpreter only:
  - `torch.cuda.device(index)` around each launch: a no-op (a CPU tensor's device index is None);
  - `torch.cuda.get_device_properties(...).multi_processor_count`, which sizes two backward
    grids: a fixed count (the results do not depend on it, only how work is split);
  - Triton's autotuner benchmarks its configurations on a GPU driver: the first one is taken;
  - the interpreter keeps bfloat16 as its uint16 bit patterns, and its `tl.dot` multiplies those
    patterns as integers (triton-lang/triton#11584; so in Triton 3.9): bfloat16 operands are
    widened to float32 first, which is what a GPU's bf16 dot computes (bf16 products are exact in
    fp32, and it accumulates in fp32).

Used in-process (`enable()`, then `LAUNCHES` counts the kernel launches by kernel name) or as a
launcher, which prints a line at a process's first kernel launch so that a test can tell the
kernels ran (a multi-rank trainer leaves with os._exit, without exit hooks):
    python tests/model/triton_interpreter.py -m pretrain.train --config ...
"""
from __future__ import annotations

import collections
import contextlib
import os
import runpy
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRITON_DIR = Path(os.environ.get("HNET_TEST_TRITON_DIR", ROOT / ".cache" / "triton"))
MAMBA_SRC = Path(os.environ.get("HNET_TEST_MAMBA_SRC", ROOT / ".cache" / "mamba_src" / "mamba_ssm"))
SM_COUNT = 4
LAUNCHES: collections.Counter = collections.Counter()
REPORT_FIRST_LAUNCH = False  # the launcher says when a process first ran a kernel


def missing() -> str | None:
    """Why the interpreter cannot be set up here, or None."""
    if not (TRITON_DIR / "triton" / "__init__.py").is_file():
        return f"no Triton under {TRITON_DIR} (make setup installs it)"
    if not (MAMBA_SRC / "ops" / "triton" / "ssd_combined.py").is_file():
        return f"no mamba-ssm sources under {MAMBA_SRC} (make setup: python scripts/fetch_mamba_src.py)"
    return None


def enable() -> None:
    """Set up this process to run mamba_ssm's Triton SSD scan on CPU tensors (idempotent)."""
    why = missing()
    if why:
        raise RuntimeError(why)
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["HNET_TRITON_ON_CPU"] = "1"
    if str(TRITON_DIR) not in sys.path:
        sys.path.insert(0, str(TRITON_DIR))
    if "mamba_ssm" not in sys.modules:
        pkg = types.ModuleType("mamba_ssm")
        pkg.__path__ = [str(MAMBA_SRC)]
        sys.modules["mamba_ssm"] = pkg

    import torch
    from triton.runtime import autotuner, interpreter

    if not getattr(torch.cuda, "_hnet_interpreter", False):
        cuda_device = torch.cuda.device
        torch.cuda.device = lambda index: contextlib.nullcontext() if index is None else cuda_device(index)
        properties = torch.cuda.get_device_properties
        torch.cuda.get_device_properties = lambda device=None: (
            types.SimpleNamespace(multi_processor_count=SM_COUNT)
            if getattr(device, "type", None) == "cpu" else properties(device))
        torch.cuda._hnet_interpreter = True
    if not getattr(autotuner.Autotuner, "_hnet_first_config", False):
        run = autotuner.Autotuner.run

        def run_first_config(self, *args, **kwargs):
            self.configs = self.configs[:1]
            return run(self, *args, **kwargs)

        autotuner.Autotuner.run = run_first_config
        autotuner.Autotuner._hnet_first_config = True
    if not getattr(interpreter.InterpreterBuilder, "_hnet_bf16_dot", False):
        import numpy as np
        import triton.language as tl

        dot = interpreter.InterpreterBuilder.create_dot

        def widened(t):
            if t.dtype != tl.bfloat16:
                return t
            return interpreter.TensorHandle(
                interpreter._convert_float(t.data, tl.bfloat16, tl.float32, None).view(np.float32), tl.float32)

        def create_dot(self, a, b, d, *args, **kwargs):
            return dot(self, widened(a), widened(b), d, *args, **kwargs)

        interpreter.InterpreterBuilder.create_dot = create_dot
        interpreter.InterpreterBuilder._hnet_bf16_dot = True
    if not getattr(interpreter.InterpretedFunction, "_hnet_counted", False):
        launch = interpreter.InterpretedFunction.run

        def counted_launch(self, *args, **kwargs):
            if not LAUNCHES and REPORT_FIRST_LAUNCH:
                print(f"[triton-interpreter] first kernel launch: {self.fn.__name__}", flush=True)
            LAUNCHES[self.fn.__name__] += 1
            return launch(self, *args, **kwargs)

        interpreter.InterpretedFunction.run = counted_launch
        interpreter.InterpretedFunction._hnet_counted = True


def main(argv: list[str]) -> None:
    """`-m module args...` or `script.py args...`, run as __main__ after enable()."""
    global REPORT_FIRST_LAUNCH
    REPORT_FIRST_LAUNCH = True
    enable()
    if argv[:1] == ["-m"]:
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
