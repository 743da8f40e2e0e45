"""Shared fixtures of the trainer tests: one small demo shard set for the whole session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer_harness import make_demo_shards  # noqa: E402


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> dict[str, str]:
    return make_demo_shards(tmp_path_factory.mktemp("trainer_shards"))
