"""Loading state dicts in the public H-Net naming (public checkpoints and this project's exports)."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import HNetConfig


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model: the message lists missing, unexpected and mis-shaped keys."""


def _describe_mismatch(expected: dict[str, torch.Size], got: dict[str, torch.Tensor], limit: int = 10) -> str:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shapes = sorted(k for k in set(expected) & set(got) if tuple(expected[k]) != tuple(got[k].shape))
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), e.g. {missing[:limit]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:limit]}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(
            f"{k}: checkpoint {tuple(got[k].shape)} vs model {tuple(expected[k])}" for k in shapes[:limit]))
    return ", ".join(parts)


def check_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problem = _describe_mismatch(expected, state_dict)
    if problem:
        raise CheckpointMismatchError(f"{source} does not match the model config: {problem}")


def _load_weights_only(path: Path):
    """torch.load restricted to tensors and plain containers. The public H-Net checkpoints may hold
    omegaconf containers (the public loader allow-lists omegaconf's ListConfig), so those classes
    are allow-listed too when omegaconf is installed; nothing else is unpickled."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:
        try:
            import omegaconf
            from omegaconf.base import ContainerMetadata, Metadata
        except ImportError:
            raise first from None
        allowed = [omegaconf.ListConfig, omegaconf.DictConfig, ContainerMetadata, Metadata, omegaconf.nodes.AnyNode]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Read a .pt state dict safely (weights only, no pickled code). Accepts a bare state dict
    or one wrapped as {"model": ...} / {"state_dict": ...}; entries that are not tensors are
    dropped. trust_pickle=True allows arbitrary pickles: only for files you trust."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False) if trust_pickle else _load_weights_only(path)
    except Exception as e:
        raise CheckpointMismatchError(
            f"{path}: cannot be read as a weights-only torch checkpoint ({e}); if the file holds other "
            f"pickled objects and you trust it, pass trust_pickle=True") from e
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointMismatchError(f"{path}: expected a state dict of tensors, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointMismatchError(f"{path}: holds no tensors")
    return tensors


def load_public_checkpoint(path: str | Path, config: HNetConfig | str | Path | None = None,
                           device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                           trust_pickle: bool = False):
    """Build an HNetForCausalLM and load a public-format state dict into it with strict=True.

    config: an HNetConfig, a path to its JSON, or None to read `<checkpoint>.json` or
    `config.json` beside the checkpoint. Raises CheckpointMismatchError naming the keys or
    shapes that differ.
    """
    from .hnet import HNetForCausalLM

    path = Path(path)
    if config is None:
        for candidate in (path.with_suffix(".json"), path.parent / "config.json"):
            if candidate.is_file():
                config = candidate
                break
        else:
            raise FileNotFoundError(f"no config given and no {path.with_suffix('.json').name} or config.json "
                                    f"beside {path}")
    if not isinstance(config, HNetConfig):
        config = HNetConfig.from_json(config)
    state_dict = read_state_dict(path, trust_pickle=trust_pickle)
    with torch.device("meta"):
        model = HNetForCausalLM(config)
    check_state_dict(model, state_dict, str(path))
    model = model.to_empty(device=device)
    model.load_state_dict(state_dict, strict=True)
    if dtype is not None:
        model = model.to(dtype)
        for level in _levels(model.backbone):
            level.residual_proj.float()
    return model


def _levels(level):
    while not level.is_innermost:
        yield level
        level = level.main_network
