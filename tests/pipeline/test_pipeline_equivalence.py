"""The pipelined H-Net against the un-pipelined one on the same micro-batches (fp32, 3 steps).

Every run takes the same three steps of four micro-batches with unequal byte counts, so their
chunk counts differ, and a gradient clip small enough that the clipped global norm decides every
update. Losses, ratio losses, clipped global norms and the full gradient of every parameter at
every step, and the parameters after the third step, must agree with plain PyTorch within 1e-5.
Three steps, because the ZeRO-3 accumulation trap (parallel/pipeline/executor.py) shows from the
second step on: `test_zero3_trap_without_the_fix` runs without the fix and must differ.

The same runs record every point-to-point operation and check the order NCCL needs (gloo,
which these tests run on, is more forgiving): `nccl_p2p_problems`.
"""
from __future__ import annotations

import json

import pytest
import torch

from trainer_harness import PY, REPO, run_ranks

pytestmark = pytest.mark.slow

WORKER = str(REPO / "tests" / "pipeline" / "pipe_worker.py")
TOL = 1e-5


def _plain(tmp_path, config: str) -> dict:
    out = tmp_path / f"plain_{config}"
    out.mkdir()
    run_ranks([PY, WORKER, str(out), "--mode", "plain", "--config", config], 1, REPO, log_dir=out, timeout=120)
    return json.loads((out / "plain.json").read_text())


def _pipe(tmp_path, config: str, pp: int, dp: int, *extra: str) -> list[dict]:
    out = tmp_path / f"pipe_{config}_{pp}x{dp}{'_'.join(extra)}"
    out.mkdir()
    run_ranks([PY, WORKER, str(out), "--mode", "pipe", "--config", config, "--pp", str(pp), "--p2p-log", *extra],
              pp * dp, REPO, log_dir=out, timeout=300)
    logs = [json.loads((out / f"rank{r}_p2p.json").read_text()) for r in range(pp * dp)]
    problems = nccl_p2p_problems(logs)
    assert not problems, "point-to-point order that would hang under NCCL:\n" + "\n".join(problems[:6])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(pp * dp)]


def nccl_p2p_problems(logs: list[list]) -> list[str]:
    """What in the recorded sends and receives (each rank's in issue order; pipe_worker.py
    record_p2p) would deadlock under NCCL although gloo ran it.

    ProcessGroupNCCL runs the un-batched sends and receives between two ranks of one group on one
    communicator and one stream, in both directions, in issue order, and tags are ignored: a
    receive at the head of that stream holds every later operation on it until its data comes,
    and the two ranks' k-th operations there must be one send and its receive (same size and
    dtype). gloo runs each on its own and matches by tag, so the CPU tests pass either way. The
    first operation on such a communicator also creates it, which blocks the host until the peer
    does its first one there: the order in which the ranks first use their communicators must
    leave no cycle."""
    per_comm: dict = {}  # (group, low, high) -> {rank: [(kind, numel, dtype)]}
    first_use: dict = {}  # rank -> [(group, low, high)] in the order of first use
    for log in logs:
        for group, me, peer, kind, numel, dtype in log:
            key = (group, min(me, peer), max(me, peer))
            ops = per_comm.setdefault(key, {}).setdefault(me, [])
            if not ops:
                first_use.setdefault(me, []).append(key)
            ops.append((kind, numel, dtype))
    problems = []
    for (group, a, b), sides in sorted(per_comm.items()):
        ops_a, ops_b = sides.get(a, []), sides.get(b, [])
        for k, (x, y) in enumerate(zip(ops_a, ops_b)):
            if x[0] == y[0] or x[1:] != y[1:]:
                problems.append(f"group {group}, ranks {a}/{b}: operation {k} is {x} on {a} but {y} on {b}")
                break
        else:
            if len(ops_a) != len(ops_b):
                problems.append(f"group {group}, ranks {a}/{b}: {len(ops_a)} operations on {a}, {len(ops_b)} on {b}")
    before: dict = {}  # communicator -> communicators some rank first-used after it
    for keys in first_use.values():
        for i, k in enumerate(keys):
            before.setdefault(k, set()).update(keys[i + 1:])
    state: dict = {}

    def cyclic(k) -> bool:  # depth-first search for a cycle through k
        if state.get(k) == "open":
            return True
        if state.get(k) == "done":
            return False
        state[k] = "open"
        found = any(cyclic(n) for n in before.get(k, ()))
        state[k] = "done"
        return found

    if any(cyclic(k) for k in sorted(before)):
        problems.append(f"the ranks first use their communicators in orders with a cycle: {first_use}")
    return problems


def test_the_nccl_order_check_finds_both_hazards():
    """The check itself: a receive posted on both sides first, and creations in crossed orders."""
    recv_first = [[["g", 0, 1, "recv", 61, "int64"], ["g", 0, 1, "send", 61, "int64"]],
                  [["g", 1, 0, "recv", 61, "int64"], ["g", 1, 0, "send", 61, "int64"]]]
    assert "operation 0" in nccl_p2p_problems(recv_first)[0]
    mirrored = [[["g", 0, 1, "send", 61, "int64"], ["g", 0, 1, "recv", 8, "float32"]],
                [["g", 1, 0, "recv", 61, "int64"], ["g", 1, 0, "send", 8, "float32"]]]
    assert nccl_p2p_problems(mirrored) == []
    crossed = [[["x", 0, 1, "send", 1, "int64"], ["y", 0, 1, "recv", 1, "int64"]],
               [["y", 1, 0, "send", 1, "int64"], ["x", 1, 0, "recv", 1, "int64"]]]
    problems = nccl_p2p_problems(crossed)
    assert len(problems) == 1 and "cycle" in problems[0], problems


def _max_diff(mine: dict, ref: dict) -> tuple[float, str]:
    worst, where = 0.0, ""
    for name, value in mine.items():
        d = (torch.tensor(value) - torch.tensor(ref[name])).abs().max().item()
        if d > worst:
            worst, where = d, name
    return worst, where


def _differences(ranks: list[dict], plain: dict) -> dict[str, tuple[float, str]]:
    first = next(r for r in ranks if r["stage"] == 0 and r["dp_rank"] == 0)
    out = {}
    for key in ("losses", "ratio_losses", "grad_norms"):
        # every rank reports the global figures
        worst = max(abs(a - b) for r in ranks for a, b in zip(r[key], plain[key]))
        out[key] = (worst, "")
    out["compression"] = (max(abs(a - b) for s, t in zip(first["compression"], plain["compression"])
                              for a, b in zip(s, t)), "")
    out["grads"] = max((_max_diff(g, plain["grads"][s]) + (f" (step {s + 1}, stage {r['stage']})",)
                        for r in ranks for s, g in enumerate(r["grads"])), key=lambda t: t[0])[:2]
    out["params"] = max((_max_diff(r["params"], plain["params"]) for r in ranks), key=lambda t: t[0])
    return out


def _assert_equivalent(ranks: list[dict], plain: dict, what: str) -> None:
    names = [set(r["params"]) for r in ranks if r["dp_rank"] == 0]
    assert set().union(*names) == set(plain["params"]), f"{what}: the stages do not hold the whole model"
    assert sum(map(len, names)) == len(plain["params"]), f"{what}: a parameter is held by two stages"
    for key, (diff, where) in _differences(ranks, plain).items():
        print(f"{what}: max {key} difference vs plain PyTorch {diff:.2e} {where}")
        assert diff < TOL, f"{what}: {key} differ from plain PyTorch by {diff} {where}"


def _assert_sharded(ranks: list[dict], dp: int) -> None:
    """Each rank holds ceil(numel / DP) elements of every tensor of its own stage, nothing else."""
    for r in ranks:
        for name, (held, full) in r["held"].items():
            assert held == -(-full // dp), f"stage {r['stage']} replica {r['dp_rank']} holds {held} of {full} of {name}"


def test_one_stage_hnet_on_two_pipeline_ranks(tmp_path):
    plain = _plain(tmp_path, "tiny")
    ranks = _pipe(tmp_path, "tiny", 2, 1)
    _assert_equivalent(ranks, plain, "1-stage H-Net, 2 pipeline ranks x 1")
    # the V really ran: the schedule's bubble was measured and activations crossed the ranks
    assert all(0.0 <= b["perf/bubble/rank0"] < 1.0 for b in ranks[0]["bubble"])
    assert all(b["perf/pipeline_bytes_sent"] > 0 for b in ranks[0]["bubble"])


def test_two_stage_hnet_on_three_pipeline_ranks(tmp_path):
    plain = _plain(tmp_path, "tiny_2stage")
    ranks = _pipe(tmp_path, "tiny_2stage", 3, 1)
    assert [len(c) for c in plain["compression"]] == [2, 2, 2]
    _assert_equivalent(ranks, plain, "2-stage H-Net, 3 pipeline ranks x 1")


def test_two_pipeline_ranks_by_two_data_parallel(tmp_path):
    plain = _plain(tmp_path, "tiny")
    ranks = _pipe(tmp_path, "tiny", 2, 2)
    _assert_equivalent(ranks, plain, "1-stage H-Net, 2 pipeline ranks x 2 data-parallel")
    _assert_sharded(ranks, dp=2)
    held = {r["stage"]: sum(h for h, _ in r["held"].values()) for r in ranks}
    full = {r["stage"]: sum(f for _, f in r["held"].values()) for r in ranks}
    print(f"elements held per rank by stage: {held} of {full}")


def test_zero3_trap_without_the_fix(tmp_path):
    """Without zeroing the partitioned gradients and moving ZeRO-3's micro-step counter at the
    start of each step, a backward that comes after another piece's backward overwrites, or the
    first one adds onto the last step's gradients: the gradients of step 2 on differ."""
    plain = _plain(tmp_path, "tiny")
    ranks = _pipe(tmp_path, "tiny", 2, 1, "--no-fix")
    diffs = _differences(ranks, plain)
    print(f"without the fix: max grads difference {diffs['grads'][0]:.2e} {diffs['grads'][1]}")
    assert diffs["grads"][0] > 1e-4, "the ZeRO-3 accumulation trap did not show: is the fix still needed?"
