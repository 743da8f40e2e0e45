"""The pipeline schedules alone (pure Python): every op once per rank, dependencies, message pairing, no deadlock."""
from __future__ import annotations

import random

import pytest

from parallel.pipeline.schedule import (SCHEDULES, Op, build_schedule, dependencies, messages_needed, messages_sent,
                                        pieces, send_order, simulate, theoretical_bubble)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("p", [2, 3])
@pytest.mark.parametrize("m", range(1, 9))
def test_schedule_is_complete_ordered_and_deadlock_free(name, p, m):
    orders = build_schedule(name, p, m)
    for r, ops in enumerate(orders):
        want = sorted(Op(k, piece, i) for piece in pieces(r, p) for k in "FB" for i in range(m))
        assert sorted(ops) == want, f"rank {r}: {ops}"
        # local dependencies in list order: a piece's backward after its forward, up after down
        seen = set()
        for op in ops:
            for dep_rank, dep in dependencies(r, op, p):
                if dep_rank == r:
                    assert dep in seen, f"rank {r}: {op} before {dep}"
            seen.add(op)
    # every message sent is needed exactly once; the receiver consumes each pair's messages
    for src in range(p):
        for dst in (src - 1, src + 1):
            if not 0 <= dst < p:
                continue
            sent = send_order(orders, p, src, dst)
            needed = [msg for op in orders[dst] for msg in messages_needed(dst, op, p) if msg.src == src]
            assert sorted(sent, key=str) == sorted(needed, key=str) and len(set(sent)) == len(sent)
    # in list order with the unit costs, and with random costs: no deadlock
    simulate(orders, p)
    rng = random.Random(p * 100 + m)
    for _ in range(5):
        costs = {}

        def random_cost(r, op):
            return costs.setdefault((r, op), rng.uniform(0.2, 3.0))

        simulate(orders, p, random_cost)


def test_simulate_catches_a_deadlock_and_a_missing_op():
    orders = build_schedule("v", 2, 2)
    bad = [list(o) for o in orders]
    # rank 1 wants the backward of micro-batch 1 before its forward of micro-batch 0 ever ran
    bad[1].remove(Op("B", "turn", 1))
    bad[1].insert(0, Op("B", "turn", 1))
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(bad, 2)
    bad = [list(o) for o in orders]
    bad[0].pop()
    with pytest.raises(RuntimeError, match="missing"):
        simulate(bad, 2)


def test_messages_of_the_v():
    # 3 ranks: down 0 -> down 1 -> turn 2 -> up 1 -> up 0; gradients the other way
    assert messages_sent(0, Op("F", "down", 0), 3)[0].dst == 1
    assert messages_sent(1, Op("F", "down", 0), 3)[0].dst == 2
    assert messages_sent(2, Op("F", "turn", 0), 3)[0].dst == 1
    assert messages_sent(0, Op("F", "up", 0), 3) == []  # the loss is on rank 0
    assert messages_sent(0, Op("B", "up", 0), 3)[0].kind == "grad_up"
    assert messages_sent(0, Op("B", "down", 0), 3) == []


def test_bubble_shrinks_with_micro_batches():
    for name in ("v", "gpipe"):
        b = [theoretical_bubble(name, 2, m) for m in (1, 2, 4, 8, 16)]
        assert b == sorted(b, reverse=True) and b[-1] < 0.1, (name, b)
    # more micro-batches in flight, less waiting: the V order with the classic 1F1B memory (p - r) waits more
    assert theoretical_bubble("1f1b", 2, 16) > theoretical_bubble("v", 2, 16)


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="unknown pipeline schedule 'zb-h1'"):
        build_schedule("zb-h1", 2, 4)
