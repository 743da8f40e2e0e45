"""Precision policy: numerically sensitive sums (residual stream, norms, scans) run in fp32, or in
the input's own precision when that is higher (float64 gradient checks)."""
import torch


def upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
