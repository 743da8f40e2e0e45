"""The pipeline tests start ranks with the trainer tests' harness, on their own demo shards."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))

from trainer_harness import make_demo_shards  # noqa: E402


@pytest.fixture(scope="session")
def pipe_shards(tmp_path_factory) -> dict[str, str]:
    return make_demo_shards(tmp_path_factory.mktemp("pipeline_shards"))
