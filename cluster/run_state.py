"""Where a training run stands, for the batch script: prints shell assignments.

    python cluster/run_state.py CONFIG [dotted.key=value ...]

prints (shell-quoted, for `eval`)

    HNET_RUN_DIR=...       the run directory the trainer will use (config + overrides)
    HNET_CKPT_DIR=...      its checkpoint directory
    HNET_LATEST_STEP=N     step of the checkpoint `latest` names; -1 when there is none
    HNET_TOTAL_STEPS=N     train.steps: the run is finished when HNET_LATEST_STEP reaches it

The batch script decides from these whether to launch at all (a finished run is not
trained again) and whether to requeue after the ranks exited (progress made, not finished).
The config is read exactly as the trainer reads it, so the two never disagree.
"""
from __future__ import annotations

import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from pretrain.checkpoint import CheckpointManager, step_of  # noqa: E402
from pretrain.config import ConfigError, load_config  # noqa: E402


def run_state(config: str, overrides: list[str]) -> dict[str, str]:
    cfg = load_config(config, overrides, validate=False)
    ckpt_dir = cfg.checkpoint_dir()
    tag = CheckpointManager(ckpt_dir).latest_tag()
    latest = -1
    if tag is not None:
        try:
            latest = step_of(tag)
        except ValueError:
            latest = -1
    return {
        "HNET_RUN_DIR": os.path.abspath(cfg.run_dir),
        "HNET_CKPT_DIR": os.path.abspath(ckpt_dir),
        "HNET_LATEST_STEP": str(latest),
        "HNET_TOTAL_STEPS": str(cfg.train.steps),
    }


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: run_state.py CONFIG [dotted.key=value ...]", file=sys.stderr)
        return 2
    try:
        state = run_state(argv[0], argv[1:])
    except ConfigError as e:
        print(f"run_state.py: config error: {e}", file=sys.stderr)
        return 2
    for k, v in state.items():
        print(f"{k}={shlex.quote(v)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
