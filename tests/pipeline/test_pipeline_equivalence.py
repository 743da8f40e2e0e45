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
    assert all(log["ops"] and log["groups"] for log in logs), "the recorder saw no operation or group"
    timeouts = {g[3] for log in logs for g in log["groups"]}
    assert timeouts == {900.0}, f"every group with train.collective_timeout_s (900 s), not torch's default: {timeouts}"
    problems = nccl_p2p_problems(logs)
    assert not problems, "point-to-point order that would hang under NCCL:\n" + "\n".join(problems[:6])
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(pp * dp)]


def nccl_p2p_problems(logs: list[dict]) -> list[str]:
    """What in the recorded group creations, sends, receives and waits (each rank's, in issue
    order; pipe_worker.py record_p2p) would hang under NCCL although gloo ran it.

    - Order. ProcessGroupNCCL ignores tags and runs a rank's un-batched sends and receives on one
      group in issue order on one stream: per pair of ranks (communicator made lazily), or per
      group (world bound to a device, as DeepSpeed binds it). So on every (group, pair) the two
      ranks' k-th operations must be a send and its receive of one size and dtype, and a rank
      may talk to only one peer per group.
    - Creation. A communicator made at its first use blocks the host until the peer uses it too:
      the order in which the ranks first use their communicators must leave no cycle.
    - No receive left waiting. When a rank sends, each receive it has not waited for yet must be
      a payload a header it already received announced (the peer issued its send with that
      header). Any other receive would spin on the GPU until a send that may wait for this
      rank, and whatever synchronises the device meanwhile hangs.
    - Groups. Bound to a device, every new group is split from the world's NCCL communicator, a
      collective the ranks outside it join too, whatever its backend, while members of a gloo
      group do not: a group with a backend of its own over some ranks must be created with
      use_local_synchronization, and every rank must create the other groups in one order."""
    problems = []
    per_comm: dict = {}  # (group, low, high) -> {rank: [(kind, numel, dtype)]}
    first_use: dict = {}  # rank -> [(group, low, high)] in the order of first use
    peers: dict = {}  # (group, rank) -> its peers there
    for log in logs:
        for group, me, peer, kind, numel, dtype in log["ops"]:
            key = (group, min(me, peer), max(me, peer))
            ops = per_comm.setdefault(key, {}).setdefault(me, [])
            if not ops:
                first_use.setdefault(me, []).append(key)
            ops.append((kind, numel, dtype))
            peers.setdefault((group, me), set()).add(peer)
    for (group, a, b), sides in sorted(per_comm.items()):
        ops_a, ops_b = sides.get(a, []), sides.get(b, [])
        for k, (x, y) in enumerate(zip(ops_a, ops_b)):
            if x[0] == y[0] or x[1:] != y[1:]:
                problems.append(f"group {group}, ranks {a}/{b}: operation {k} is {x} on {a} but {y} on {b}")
                break
        else:
            if len(ops_a) != len(ops_b):
                problems.append(f"group {group}, ranks {a}/{b}: {len(ops_a)} operations on {a}, {len(ops_b)} on {b}")
    problems += [f"rank {me} talks to ranks {sorted(p)} on group {g}: one stream when the world is bound to a GPU"
                 for (g, me), p in sorted(peers.items()) if len(p) > 1]
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
    for log in logs:  # receives left waiting
        ops, announced = log["ops"], set(log["announced"])
        waited: set = set()
        waits_before: dict = {}  # op index -> the receives waited for just before it was issued
        for j, at in log["waits"]:
            waits_before.setdefault(at, []).append(j)
        for i, (group, me, peer, kind, _, _) in enumerate(ops):
            waited.update(waits_before.get(i, []))
            if kind != "send":
                continue
            early = [j for j in range(i) if ops[j][3] == "recv" and j not in waited and j not in announced]
            if early:
                problems.append(f"rank {me} sends (operation {i}) while receive {early[0]} {ops[early[0]]}, "
                                f"posted before its message was announced, waits")
                break
    world = len(logs)
    orders = {tuple((tuple(r) if r else None, b) for r, b, local, _ in log["groups"] if not local) for log in logs}
    if len(orders) > 1:
        problems.append(f"the ranks create their groups in {len(orders)} different orders")
    problems += [f"new_group({ranks}, backend={backend!r}) without use_local_synchronization: bound to a GPU, the "
                 f"other ranks would split the world's NCCL communicator and its members would not"
                 for ranks, backend, local, _ in logs[0]["groups"] if backend and ranks and len(ranks) < world and not local]
    return problems


def _rank_log(ops, waited=(), groups=(), announced=()):
    """A log as record_p2p writes it; `waited`: the receives waited for right after their posting."""
    return {"ops": [list(op) for op in ops], "waits": [[j, j + 1] for j in waited], "groups": [list(g) for g in groups],
            "announced": list(announced)}


def test_the_nccl_order_check_finds_each_hazard():
    """The check itself, on hand-written logs: each hazard alone, and a clean exchange."""
    hdr, act = (61, "torch.int64"), (8, "torch.float32")
    clean = [_rank_log([("d", 0, 1, "send", *hdr), ("d", 0, 1, "send", *act), ("u", 0, 1, "recv", *hdr),
                        ("u", 0, 1, "recv", *act)], waited=[2, 3], announced=[3]),
             _rank_log([("d", 1, 0, "recv", *hdr), ("d", 1, 0, "recv", *act), ("u", 1, 0, "send", *hdr),
                        ("u", 1, 0, "send", *act)], waited=[0], announced=[1])]
    assert nccl_p2p_problems(clean) == []
    # the next header posted right after a message's payloads (before this rank's next send)
    ahead = [_rank_log([("d", 0, 1, "send", *hdr), ("d", 0, 1, "send", *act), ("d", 0, 1, "send", *hdr)]),
             _rank_log([("d", 1, 0, "recv", *hdr), ("d", 1, 0, "recv", *act), ("d", 1, 0, "recv", *hdr),
                        ("u", 1, 0, "send", *hdr)], waited=[0], announced=[1])]
    problems = nccl_p2p_problems(ahead)
    assert any("rank 1 sends (operation 3) while receive 2" in p for p in problems), problems
    # both post a receive first on one shared group (the defect fixed in cca66f9)
    shared = [_rank_log([("g", 0, 1, "recv", *hdr), ("g", 0, 1, "send", *hdr)], waited=[0]),
              _rank_log([("g", 1, 0, "recv", *hdr), ("g", 1, 0, "send", *hdr)], waited=[0])]
    assert any("operation 0" in p for p in nccl_p2p_problems(shared))
    # in order, but communicators first used in crossed orders
    crossed = [_rank_log([("x", 0, 1, "send", *hdr), ("y", 0, 1, "recv", *hdr)], waited=[1]),
               _rank_log([("y", 1, 0, "send", *hdr), ("x", 1, 0, "recv", *hdr)], waited=[1])]
    problems = nccl_p2p_problems(crossed)
    assert len(problems) == 1 and "cycle" in problems[0], problems
    # in order, created in one order, but a header receive posted early and left waiting over a send
    early = [_rank_log([("d", 0, 1, "send", *hdr), ("u", 0, 1, "recv", *hdr), ("d", 0, 1, "send", *hdr),
                        ("u", 0, 1, "recv", *hdr), ("d", 0, 1, "send", *hdr)], waited=[1]),
             _rank_log([("d", 1, 0, "recv", *hdr), ("u", 1, 0, "send", *hdr), ("d", 1, 0, "recv", *hdr),
                        ("u", 1, 0, "send", *hdr), ("d", 1, 0, "recv", *hdr)], waited=[0, 2, 4])]
    problems = nccl_p2p_problems(early)
    assert len(problems) == 1 and "rank 0 sends (operation 4) while receive 3" in problems[0], problems
    # one rank talking to two peers on one group
    two = [_rank_log([("g", 0, 1, "send", *hdr)]), _rank_log([("g", 1, 0, "recv", *hdr), ("g", 1, 2, "send", *hdr)],
                                                              waited=[0]),
           _rank_log([("g", 2, 1, "recv", *hdr)], waited=[0])]
    assert any("talks to ranks [0, 2]" in p for p in nccl_p2p_problems(two))
    # groups: a gloo group over some ranks, not locally synchronised; and two orders of creation
    gloo = [_rank_log([], groups=[([0, 1], None, False, 9.0), ([0], "gloo", False, 9.0)]) for _ in range(2)]
    assert any("without use_local_synchronization" in p for p in nccl_p2p_problems(gloo))
    local = [_rank_log([], groups=[([0, 1], None, False, 9.0), ([0], "gloo", True, 9.0)]) for _ in range(2)]
    assert nccl_p2p_problems(local) == []
    swapped = [_rank_log([], groups=[([0], None, False, 9.0), ([1], None, False, 9.0)]),
               _rank_log([], groups=[([1], None, False, 9.0), ([0], None, False, 9.0)])]
    assert any("2 different orders" in p for p in nccl_p2p_problems(swapped))


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
