"""Bad inputs fail at start (before any engine exists) with a message naming the problem."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from trainer_harness import REPO, base_env, train_argv


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(train_argv(f"run_dir={tmp_path / 'run'}", *overrides), cwd=tmp_path, env=base_env(),
                          capture_output=True, text=True, timeout=120)


def expect_failure(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, f"expected a refusal, got rc={res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"
    for needle in needles:
        assert needle in res.stderr, f"{needle!r} not named in:\n{res.stderr[-2000:]}"
    assert "Traceback" not in res.stderr


def test_unknown_config_key(tmp_path, demo_shards):
    res = run_cli(tmp_path, f"data.train_index=[{demo_shards['train']}]", "train.stpes=3")
    expect_failure(res, "train.stpes")


def test_bad_value_type(tmp_path, demo_shards):
    res = run_cli(tmp_path, f"data.train_index=[{demo_shards['train']}]", "optim.lr=fast")
    expect_failure(res, "optim.lr")


def test_empty_shard_list(tmp_path):
    res = run_cli(tmp_path, "data.train_index=[]")
    expect_failure(res, "data.train_index")


def test_deepspeed_file_contradicting_experiment(tmp_path, demo_shards):
    ds = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    ds["gradient_clipping"] = 0.5
    bad = tmp_path / "bad_ds.json"
    bad.write_text(json.dumps(ds))
    res = run_cli(tmp_path, f"data.train_index=[{demo_shards['train']}]", f"train.ds_config={bad}", "optim.grad_clip=1.0")
    expect_failure(res, "gradient_clipping", "optim.grad_clip", str(bad))


@pytest.mark.slow
def test_checkpoint_of_another_model_shape(tmp_path, demo_shards):
    """A 1-process plain run writes a checkpoint; asking for a wider model in that run dir is refused."""
    ok = run_cli(tmp_path, f"data.train_index=[{demo_shards['train']}]", "train.engine=plain", "train.steps=2",
                 "tracking.enabled=false")
    assert ok.returncode == 0, ok.stderr[-3000:]
    res = run_cli(tmp_path, f"data.train_index=[{demo_shards['train']}]", "train.engine=plain", "train.steps=4",
                  "tracking.enabled=false", "model.d_model=[32,64]")
    expect_failure(res, "another model", "d_model", "[32, 48]", "[32, 64]")


@pytest.mark.slow
def test_consecutive_non_finite_steps_stop_with_step_and_keys(tmp_path, demo_shards):
    res = run_cli(tmp_path, f"data.train_index=[{demo_shards['train']}]", "train.engine=plain", "train.steps=6",
                  "tracking.enabled=false", "debug.nan_at_steps=[2,3]", "train.max_bad_steps=2")
    expect_failure(res, "stopping at step 3", "2 consecutive steps", "shard-")
    log = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert len(log) == 3 and '"skipped": true' in log[1]


def _piped_index(tmp_path: Path, demo_shards) -> Path:
    index = json.loads(Path(demo_shards["train"]).read_text())
    base = Path(demo_shards["train"]).parent
    for s in index["shards"]:
        s["path"] = f"pipe:cat {base / s['path']}"
    out = tmp_path / "piped" / "index.json"
    out.parent.mkdir()
    out.write_text(json.dumps(index))
    return out


def test_pipe_urls_need_an_explicit_opt_in(tmp_path, demo_shards):
    piped = _piped_index(tmp_path, demo_shards)
    res = run_cli(tmp_path, f"data.train_index=[{piped}]", "train.engine=plain", "train.steps=2")
    expect_failure(res, "data.train_index", "pipe:cat", "data.allow_pipe_urls=true")


@pytest.mark.slow
def test_pipe_urls_allowed_train(tmp_path, demo_shards):
    piped = _piped_index(tmp_path, demo_shards)
    res = run_cli(tmp_path, f"data.train_index=[{piped}]", "data.allow_pipe_urls=true", "train.engine=plain",
                  "train.steps=2", "tracking.enabled=false")
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory, demo_shards):
    """A 2-step plain run with a checkpoint: the run directory the refusals below start from."""
    tmp = tmp_path_factory.mktemp("plain_run")
    ok = run_cli(tmp, f"data.train_index=[{demo_shards['train']}]", "train.engine=plain", "train.steps=2",
                 "tracking.enabled=false")
    assert ok.returncode == 0, ok.stderr[-3000:]
    return tmp


def _copy_run(plain_run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(plain_run / "run", tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_resume_with_another_data_seed_is_refused_cleanly(plain_run, tmp_path, demo_shards):
    run = _copy_run(plain_run, tmp_path)
    before = (run / "config.yaml").read_text()
    res = run_cli(tmp_path, f"data.train_index=[{demo_shards['train']}]", "train.engine=plain", "train.steps=4",
                  "tracking.enabled=false", "data.seed=7")
    expect_failure(res, "refusing to resume from", "step00000002", "'data' state", "seed 0")
    assert (run / "config.yaml").read_text() == before, "a refused resume leaves the run's config as it was"
    assert not (run / "run.lease").exists(), "a refused resume releases the run directory"


@pytest.mark.slow
def test_a_latest_that_names_a_missing_or_damaged_checkpoint_is_named(plain_run, tmp_path, demo_shards):
    run = _copy_run(plain_run, tmp_path)
    ckpts = run / "checkpoints"
    common = (f"data.train_index=[{demo_shards['train']}]", "train.engine=plain", "train.steps=4",
              "tracking.enabled=false")
    (ckpts / "latest").write_text("step00000099")
    expect_failure(run_cli(tmp_path, *common), "latest names step00000099, which is not there",
                   "the complete checkpoints here are ['step00000002']")
    (ckpts / "latest").write_text("step00000002")
    (ckpts / "step00000002" / "meta.json").write_text('{"step": 2, "mod')
    expect_failure(run_cli(tmp_path, *common), "cannot read", "step00000002/meta.json",
                   "there is no other complete checkpoint here")


def _cli(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess:
    from trainer_harness import PY

    return subprocess.run([PY, *argv], cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_checkpoint_tools_name_a_missing_checkpoint(plain_run, tmp_path):
    missing = str(tmp_path / "nowhere")
    for module, args, prefix in (("pretrain.export", [missing, str(tmp_path / "out")], "[export] error"),
                                 ("pretrain.reshard", [missing], "[reshard] error"),
                                 ("pretrain.sample", [missing, "--prompt", "a"], "[sample] error")):
        expect_failure(_cli(tmp_path, "-m", module, *args), prefix, "nowhere")
    # the public naming: NAME.pt with NAME.json beside it, as load_public_checkpoint reads it
    res = _cli(tmp_path, "-m", "pretrain.export", str(plain_run / "run"), str(tmp_path / "exp"))
    assert res.returncode == 0, res.stderr[-2000:]
    (tmp_path / "exp" / "model.pt").rename(tmp_path / "exp" / "hnet_tiny.pt")
    (tmp_path / "exp" / "config.json").rename(tmp_path / "exp" / "hnet_tiny.json")
    res = _cli(tmp_path, "-m", "pretrain.sample", str(tmp_path / "exp" / "hnet_tiny.pt"), "--prompt", "ab",
               "--max-bytes", "4")
    assert res.returncode == 0 and "--- 0" in res.stdout, res.stderr[-2000:]
    (tmp_path / "exp" / "hnet_tiny.json").unlink()
    expect_failure(_cli(tmp_path, "-m", "pretrain.sample", str(tmp_path / "exp" / "hnet_tiny.pt"), "--prompt", "a"),
                   "needs its config JSON", "hnet_tiny.json")
