"""Shared fixtures of the trainer tests: one small demo shard set for the whole session."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_harness import PY, REPO, base_env  # noqa: E402


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict[str, str]:
    """~450 KB of demo documents as WebDataset shards: train and val index paths."""
    out = tmp_path_factory.mktemp("trainer_shards")
    subprocess.run([PY, "-m", "data_pipeline.shard", "--demo", str(out), "--demo-bytes", "300KB"], cwd=REPO,
                   env=base_env(), check=True, capture_output=True, timeout=120)
    return {"train": str(out / "train" / "index.json"), "val": str(out / "val" / "index.json")}
