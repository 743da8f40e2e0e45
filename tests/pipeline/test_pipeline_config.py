"""Bad pipeline settings are refused at start, before any process group or engine exists,
with a message that names the setting and the reason."""
from __future__ import annotations

import subprocess
from pathlib import Path

from trainer_harness import REPO, base_env, train_argv

TINY_2STAGE = str(REPO / "pretrain" / "configs" / "tiny_2stage.yaml")


def refused(tmp_path: Path, shards: dict, world: int, *overrides: str, config: str | None = None) -> str:
    """Runs rank 0 of a `world`-rank launch; returns its error output (it must refuse, rc 2)."""
    argv = train_argv(f"run_dir={tmp_path / 'run'}", f"data.train_index=[{shards['train']}]", *overrides,
                      **({"config": config} if config else {}))
    env = base_env({"RANK": "0", "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                    "MASTER_PORT": "1"})  # nothing listens there: a refusal must come before any rendezvous
    res = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, f"expected a refusal, got rc={res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    assert "Traceback" not in res.stderr
    return res.stderr


def test_more_pipeline_stages_than_the_hierarchy_has(tmp_path, pipe_shards):
    # a 1-stage H-Net has two levels of pieces (its outer level, the main network): at most 2 ranks
    err = refused(tmp_path, pipe_shards, 3, "parallel.pipeline_stages=3")
    assert "parallel.pipeline_stages=3" in err and "at most 2" in err, err


def test_world_not_divisible_by_pipeline_stages(tmp_path, pipe_shards):
    err = refused(tmp_path, pipe_shards, 3, "parallel.pipeline_stages=2")
    assert "world size 3 is not divisible" in err and "parallel.pipeline_stages=2" in err, err


def test_unknown_schedule(tmp_path, pipe_shards):
    err = refused(tmp_path, pipe_shards, 2, "parallel.pipeline_stages=2", "parallel.schedule=zigzag")
    assert "parallel.schedule" in err and "zigzag" in err and "1f1b" in err, err


def test_pipeline_levels_that_do_not_cover_the_hierarchy(tmp_path, pipe_shards):
    err = refused(tmp_path, pipe_shards, 3, "parallel.pipeline_stages=3", "parallel.pipeline_levels=[1,1,2]", config=TINY_2STAGE)
    assert "parallel.pipeline_levels" in err, err


def test_pipeline_needs_zero3(tmp_path, pipe_shards):
    err = refused(tmp_path, pipe_shards, 2, "parallel.pipeline_stages=2", f"train.ds_config={REPO / 'ds_configs' / 'zero2.json'}")
    assert "ZeRO stage 3" in err, err
