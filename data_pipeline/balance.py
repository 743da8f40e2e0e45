"""Load balancing: assign pieces to dp_world x M micro-batches with near-equal cost per rank.

The cost of a piece of n positions (one attention span: pieces are separate cu_seqlens segments)
comes from a cost model the caller provides: by default its byte count (`ByteCost`); the trainer
passes the model's FLOP estimate, linear in bytes for the outer stages and quadratic in the
document's chunk count for each attention stage (`pretrain.model.DocCostModel`).

The partition is greedy LPT (longest processing time first) with a byte capacity per
micro-batch: pieces carried over from the previous step go first (so nothing starves), then the
rest by decreasing cost; each goes to the cheapest rank that still has room for it, into the
fullest of that rank's micro-batches that fits (best fit). What fits nowhere is carried to the
next step. The result depends only on its inputs, so every rank computes the same partition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .packer import Piece, cut_piece, split_piece


class ByteCost:
    """The default cost of a document: its byte count. Any object with `__call__(n_bytes) -> cost`,
    `state_dict()` and `load_state_dict()` can replace it; the trainer hands the loader the
    model's FLOP estimate (`pretrain.model.DocCostModel`), so the data pipeline never imports the
    model. Its state has DocCostModel's form (linear 1, no attention terms); loading a state
    changes nothing: a run configured to balance by bytes does so, whatever it resumed from."""

    def __call__(self, n_bytes: int) -> float:
        return float(n_bytes)

    def state_dict(self) -> dict:
        return {"linear_per_byte": 1.0, "attention_terms": []}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class Partition:
    """bins[b] = indices of the items in micro-batch b; micro-batch b belongs to rank b // per_rank."""

    bins: list[list[int]]
    per_rank: int
    unplaced: list[int]
    rank_cost: list[float]
    rank_bytes: list[int]

    def rank_bins(self, rank: int) -> list[list[int]]:
        return self.bins[rank * self.per_rank:(rank + 1) * self.per_rank]


def partition_lpt(sizes: list[int], costs: list[float], n_ranks: int, per_rank: int,
                  capacity: int, n_priority: int = 0, refine_iters: int = 64) -> Partition:
    """Greedy LPT over ranks with best-fit bins; items [0, n_priority) are placed first, in order.

    Then up to `refine_iters` local-search moves between the costliest and the cheapest rank.
    Time O(items x (ranks + per_rank)) for LPT; ties go to the lower rank / bin index (deterministic).
    """
    rest = sorted(range(n_priority, len(sizes)), key=lambda i: (-costs[i], -sizes[i], i))
    order = list(range(min(n_priority, len(sizes)))) + rest
    room = [[capacity] * per_rank for _ in range(n_ranks)]
    max_room = [capacity] * n_ranks
    rank_cost = [0.0] * n_ranks
    rank_bytes = [0] * n_ranks
    bins: list[list[int]] = [[] for _ in range(n_ranks * per_rank)]
    unplaced = []
    for i in order:
        s = sizes[i]
        best = -1
        for r in range(n_ranks):
            if max_room[r] >= s and (best < 0 or rank_cost[r] < rank_cost[best]):
                best = r
        if best < 0:
            unplaced.append(i)
            continue
        rr = room[best]
        j = min((j for j in range(per_rank) if rr[j] >= s), key=lambda j: (rr[j], j))
        rr[j] -= s
        max_room[best] = max(rr)
        rank_cost[best] += costs[i]
        rank_bytes[best] += s
        bins[best * per_rank + j].append(i)
    part = Partition(bins, per_rank, unplaced, rank_cost, rank_bytes)
    _refine(part, sizes, costs, room, capacity, refine_iters, n_priority)
    for b in part.bins:
        b.sort()
    part.unplaced.sort()
    return part


def imbalance(values: list[float]) -> float:
    """max / mean (1.0 = perfectly balanced)."""
    mean = sum(values) / max(1, len(values))
    return max(values) / mean if mean > 0 else 1.0


def round_robin_costs(costs: list[float], n_ranks: int) -> list[float]:
    """Per-rank cost when items are dealt to ranks in arrival order (the naive baseline)."""
    out = [0.0] * n_ranks
    for i, c in enumerate(costs):
        out[i % n_ranks] += c
    return out


def _refine(part: Partition, sizes, costs, room, capacity: int, iters: int, n_priority: int = 0) -> None:
    """Local search after LPT. With few micro-batches per rank, a rank can run out of bytes before
    its cost catches up (long pieces cost more per byte). Each iteration applies the move between
    the costliest rank (hi), the cheapest (lo) and the carried-over items that lowers max/mean most:
    add a carried item to lo, move hi -> lo, swap hi <-> lo, swap an item of hi for a cheaper carried
    one, or carry an item of hi over to the next step. Items carried in from the previous step
    (index < n_priority) are never carried again, so nothing starves."""
    M = part.per_rank
    cost, nbytes = part.rank_cost, part.rank_bytes
    R = len(cost)
    if R < 2:
        return
    for _ in range(iters):
        order = sorted(range(R), key=lambda r: (cost[r], r))
        lo, hi = order[0], order[-1]
        total = sum(cost)
        rest_max = max((cost[r] for r in order[1:-1]), default=float("-inf"))
        cur = cost[hi] * R / total if total > 0 else 1.0

        def score(d_hi: float, d_lo: float) -> float:
            t = total + d_hi + d_lo
            return max(cost[hi] + d_hi, cost[lo] + d_lo, rest_max) * R / t if t > 0 else float("inf")

        best = (cur * (1 - 1e-6), None)
        lo_room = room[lo]
        hi_room = room[hi]
        lo_fit = lambda s, extra=0: min((b for b in range(M) if lo_room[b] + extra >= s),  # noqa: E731
                                        key=lambda b: (lo_room[b], b), default=None)
        # carried items worth trying: the cheapest ones (they swap in or fill in most easily)
        spare = sorted(part.unplaced, key=lambda u: (costs[u], u))[:64]
        for u in spare:
            b = lo_fit(sizes[u])
            if b is not None:
                sc = score(0.0, costs[u])
                if sc < best[0]:
                    best = (sc, ("add", u, b))
        for bi in range(M):
            for i in part.bins[hi * M + bi]:
                ci, si = costs[i], sizes[i]
                b = lo_fit(si)
                if b is not None:
                    sc = score(-ci, ci)
                    if sc < best[0]:
                        best = (sc, ("move", i, bi, b))
                if i >= n_priority:
                    sc = score(-ci, 0.0)
                    if sc < best[0]:
                        best = (sc, ("drop", i, bi))
                for bj in range(M):
                    for j in part.bins[lo * M + bj]:
                        d = ci - costs[j]
                        if d > 0 and lo_room[bj] + sizes[j] >= si and hi_room[bi] + si >= sizes[j]:
                            sc = score(-d, d)
                            if sc < best[0]:
                                best = (sc, ("swap", i, bi, j, bj))
                if i >= n_priority:
                    for u in spare:
                        if costs[u] < ci and hi_room[bi] + si >= sizes[u]:
                            sc = score(costs[u] - ci, 0.0)
                            if sc < best[0]:
                                best = (sc, ("trade", i, bi, u))
        move = best[1]
        if move is None:
            return
        kind = move[0]
        if kind == "add":
            _, u, b = move
            _place(part, room, sizes, costs, u, lo, b)
            part.unplaced.remove(u)
        elif kind == "move":
            _, i, bi, b = move
            _take(part, room, sizes, costs, i, hi, bi)
            _place(part, room, sizes, costs, i, lo, b)
        elif kind == "drop":
            _, i, bi = move
            _take(part, room, sizes, costs, i, hi, bi)
            part.unplaced.append(i)
        elif kind == "swap":
            _, i, bi, j, bj = move
            _take(part, room, sizes, costs, i, hi, bi)
            _take(part, room, sizes, costs, j, lo, bj)
            _place(part, room, sizes, costs, j, hi, bi)
            _place(part, room, sizes, costs, i, lo, bj)
        else:  # trade
            _, i, bi, u = move
            _take(part, room, sizes, costs, i, hi, bi)
            _place(part, room, sizes, costs, u, hi, bi)
            part.unplaced.remove(u)
            part.unplaced.append(i)


def _take(part, room, sizes, costs, i, r, b) -> None:
    part.bins[r * part.per_rank + b].remove(i)
    room[r][b] += sizes[i]
    part.rank_cost[r] -= costs[i]
    part.rank_bytes[r] -= sizes[i]


def _place(part, room, sizes, costs, i, r, b) -> None:
    part.bins[r * part.per_rank + b].append(i)
    room[r][b] -= sizes[i]
    part.rank_cost[r] += costs[i]
    part.rank_bytes[r] += sizes[i]


@dataclass
class StepPlan:
    """One step's assignment: window (pieces, with gap-filling heads appended), their sizes and
    costs, the partition into n_ranks x per_rank micro-batches, and the micro-batch count used."""

    window: list[Piece]
    sizes: list[int]
    costs: list[float]
    part: Partition
    per_rank: int


def plan_step(window: list[Piece], n_priority: int, n_ranks: int, per_rank: int, capacity: int,
              cost_model, last: bool = False, restart_split_docs: bool = False,
              min_gap_fill: int = 32) -> StepPlan:
    """Partition a step's window: LPT + local search, then gap filling by cutting long pieces.

    window[:n_priority] are pieces carried from the previous step (placed first). `last`: no more
    data will come, so use as few micro-batches per rank as hold everything (at most per_rank).
    """
    # pieces over a row: a carry saved under a larger micro_batch_bytes
    window = [q for p in window for q in split_piece(p, capacity, restart_split_docs)]
    n_priority = min(n_priority, len(window))
    sizes = [p.length for p in window]
    costs = [cost_model(n) for n in sizes]
    m = per_rank
    if last:
        m = min(per_rank, max(1, math.ceil(sum(sizes) / (n_ranks * capacity))))
    while True:
        part = partition_lpt(sizes, costs, n_ranks, m, capacity, n_priority)
        if not (last and part.unplaced and m < per_rank):
            break
        m += 1
    if not last:
        _fill_gaps(window, sizes, costs, part, capacity, cost_model, restart_split_docs, min_gap_fill)
    return StepPlan(window, sizes, costs, part, m)


def _fill_gaps(window, sizes, costs, part: Partition, capacity: int, cost_model, restart: bool,
               min_gap_fill: int) -> None:
    """Cut carried-over pieces longer than a micro-batch's free room: the head fills the room, the
    tail stays carried (its document goes on without BOS). Cheapest ranks first, and only while
    max/mean cost over ranks does not get worse."""
    M = part.per_rank
    room = [capacity - sum(sizes[i] for i in b) for b in part.bins]
    cost_max, total = max(part.rank_cost), sum(part.rank_cost)
    for r in sorted(range(len(part.rank_cost)), key=lambda r: (part.rank_cost[r], r)):
        for b in range(r * M, (r + 1) * M):
            while room[b] >= min_gap_fill and part.unplaced:
                u = max(part.unplaced, key=lambda i: (sizes[i], -i))
                if sizes[u] <= room[b] + 1:  # whole pieces that fit are the partition's business
                    break
                head, tail = cut_piece(window[u], room[b], restart)
                c = cost_model(head.length)
                new_max = max(cost_max, part.rank_cost[r] + c)
                if new_max * total > cost_max * (total + c) * (1 + 1e-12):
                    break
                cost_max, total = new_max, total + c
                window[u] = tail
                sizes[u], costs[u] = tail.length, cost_model(tail.length)
                window.append(head)
                sizes.append(head.length)
                costs.append(c)
                part.bins[b].append(len(window) - 1)
                part.rank_cost[r] += c
                part.rank_bytes[r] += head.length
                room[b] -= head.length
