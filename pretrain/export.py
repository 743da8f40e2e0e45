"""Export a training checkpoint as a consolidated fp32 state dict in the public H-Net naming.

    python -m pretrain.export CKPT OUT

CKPT: a run directory, its checkpoints directory (the `latest` tag is used) or one tag directory.
OUT: a directory; receives `model.pt` (fp32 state dict, public names, loadable with strict=True)
and `config.json` (public fields plus ratio_targets / ratio_alpha). Load it with
`pretrain.model.load_public_checkpoint(OUT/model.pt)` or `HNetForCausalLM(HNetConfig.from_json(...))`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from pretrain.checkpoint import COMPLETE, CheckpointManager
from pretrain.errors import TrainingError
from pretrain.reshard import find_checkpoint_root
from parallel.step import PlainStep


def consolidated_state_dict(root: str, tag: str) -> dict[str, torch.Tensor]:
    """fp32 full parameters from a ZeRO (any stage; pipelined or not) or plain-engine checkpoint."""
    plain = os.path.join(root, tag, PlainStep.PLAIN_FILE)
    if os.path.isfile(plain):
        return torch.load(plain, map_location="cpu", weights_only=False)["module"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from pretrain.reshard import pipeline_parts

    state: dict[str, torch.Tensor] = {}
    for part in pipeline_parts(os.path.join(root, tag)):
        # a pipelined run: every stage is a ZeRO checkpoint of its own, under the full model's names
        if part:
            sd = get_fp32_state_dict_from_zero_checkpoint(os.path.join(root, tag), tag=part)
        else:
            sd = get_fp32_state_dict_from_zero_checkpoint(root, tag=tag)
        state.update({k: v.float().contiguous() for k, v in sd.items()})
    return state


def export(ckpt: str, out: str, tag: str | None = None) -> tuple[str, str]:
    from pretrain.model import HNetConfig, HNetForCausalLM, check_state_dict

    root = find_checkpoint_root(ckpt)
    if tag is None:
        tag = os.path.basename(os.path.abspath(ckpt)) if os.path.isfile(os.path.join(ckpt, COMPLETE)) \
            else CheckpointManager(root).latest_tag()
    meta = CheckpointManager(root).read_meta(tag)
    config = HNetConfig.from_dict(meta["model"])
    state = consolidated_state_dict(root, tag)
    with torch.device("meta"):
        model = HNetForCausalLM(config)
    check_state_dict(model, state, f"{root}/{tag}")
    os.makedirs(out, exist_ok=True)
    model_path, config_path = os.path.join(out, "model.pt"), os.path.join(out, "config.json")
    torch.save(state, model_path)
    cfg = config.public_dict()
    cfg.update(ratio_targets=config.ratio_targets, ratio_alpha=config.ratio_alpha)
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=1)
    return model_path, config_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pretrain.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--tag", default=None)
    a = ap.parse_args(argv)
    try:
        model_path, config_path = export(a.ckpt, a.out, a.tag)
    except (FileNotFoundError, TrainingError) as e:  # no checkpoint there, a damaged one
        print(f"[export] error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {model_path} and {config_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
