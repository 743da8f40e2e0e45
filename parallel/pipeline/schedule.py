"""Pipeline schedules over an H-Net split along its hierarchy: the per-rank order of work.

Placement (a V, as in the zero-bubble V schedules, Qi et al. 2024 "Zero Bubble Pipeline
Parallelism", and DeepSeek's DualPipeV): with p pipeline ranks, rank r < p-1 holds two pieces,
"down" (the encoders of its levels, virtual chunk r) and "up" (their decoders, chunk 2p-1-r);
the last rank holds the innermost levels whole, the "turn" (chunks p-1 and p). A micro-batch
goes down the ranks and comes back up:

    F: down(0) -> down(1) -> ... -> turn(p-1) -> ... -> up(1) -> up(0) -> loss
    B: up(0) -> up(1) -> ... -> turn(p-1) -> ... -> down(1) -> down(0)

Backward is not split into input- and weight-gradient halves: under ZeRO-3 the gradient
reduce-scatter runs from the parameters' accumulation hooks, which hand-assigned weight
gradients would bypass (so the "V" order here is ZB-V's order with fused backward).

Orders are built by a greedy list scheduler on unit costs (forward 1 per chunk, backward 2, the
turn counting as 2 chunks): whenever a rank is free it takes the ready op its policy prefers:

    gpipe  every forward before any backward
    1f1b   a ready backward first (oldest micro-batch), else a forward (oldest), at most
           p - r micro-batches in flight on rank r (started, not yet finished backward): the
           memory profile of the classic one-forward-one-backward schedule
    v      a ready backward first (the up piece before the down piece), else a forward of the
           up piece (it finishes micro-batches), else a forward of the down piece; at most 2p
           micro-batches in flight on every rank (in the V every rank's micro-batch waits for a
           round trip through all deeper ranks, so deep ranks need as many as shallow ones)

`micro_batches_in_flight` > 0 caps every rank at that many instead (the memory knob). The
resulting per-rank lists are fixed: every data-parallel replica of a stage runs the same list
(ZeRO-3's parameter all-gathers are collectives over the replicas), and ranks execute them in
order, waiting only for their inputs; a run in list order cannot deadlock whatever the real
costs (`simulate` checks this for any costs).
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEDULES = ("v", "1f1b", "gpipe")


@dataclass(frozen=True, order=True)
class Op:
    kind: str  # "F" | "B"
    piece: str  # "down" | "up" | "turn"
    mb: int

    def __str__(self) -> str:
        return f"{self.kind}{self.piece}{self.mb}"


@dataclass(frozen=True)
class Message:
    """One tensor hand-off between adjacent ranks: activations going down or up, gradients back."""

    src: int
    dst: int
    kind: str  # "act_down" | "act_up" | "grad_up" | "grad_down"
    mb: int


def pieces(rank: int, p: int) -> list[str]:
    return ["turn"] if rank == p - 1 else ["down", "up"]


def chunk_of(rank: int, piece: str, p: int) -> int:
    """The virtual chunk index of a piece in the V (the turn is chunks p-1 and p)."""
    return {"down": rank, "up": 2 * p - 1 - rank, "turn": p - 1}[piece]


def chunks_in(piece: str) -> int:
    return 2 if piece == "turn" else 1


def dependencies(rank: int, op: Op, p: int) -> list[tuple[int, Op]]:
    """(rank, op) pairs that must finish before `op` runs on `rank`."""
    i, last = op.mb, p - 1
    if op.kind == "F":
        if op.piece == "down":
            return [(rank - 1, Op("F", "down", i))] if rank > 0 else []
        if op.piece == "turn":
            return [(rank - 1, Op("F", "down", i))] if rank > 0 else []
        inner = Op("F", "turn" if rank + 1 == last else "up", i)
        return [(rank, Op("F", "down", i)), (rank + 1, inner)]
    if op.piece == "up":
        return [(rank, Op("F", "up", i))] + ([(rank - 1, Op("B", "up", i))] if rank > 0 else [])
    if op.piece == "turn":
        return [(rank, Op("F", "turn", i))] + ([(rank - 1, Op("B", "up", i))] if rank > 0 else [])
    inner = Op("B", "turn" if rank + 1 == last else "down", i)
    return [(rank, Op("B", "up", i)), (rank + 1, inner)]


def messages_sent(rank: int, op: Op, p: int) -> list[Message]:
    """What `op` on `rank` sends when it finishes."""
    i = op.mb
    if op.kind == "F":
        if op.piece == "down":
            return [Message(rank, rank + 1, "act_down", i)]
        return [Message(rank, rank - 1, "act_up", i)] if rank > 0 else []
    if op.piece in ("up",):
        return [Message(rank, rank + 1, "grad_up", i)]
    return [Message(rank, rank - 1, "grad_down", i)] if rank > 0 else []


def messages_needed(rank: int, op: Op, p: int) -> list[Message]:
    """What `op` on `rank` must have received before it runs."""
    out = []
    for dep_rank, dep in dependencies(rank, op, p):
        if dep_rank != rank:
            out += [m for m in messages_sent(dep_rank, dep, p) if m.dst == rank]
    return out


def cost(op: Op, forward: float = 1.0, backward: float = 2.0) -> float:
    return (forward if op.kind == "F" else backward) * chunks_in(op.piece)


def in_flight_cap(name: str, rank: int, p: int, m: int, micro_batches_in_flight: int = 0) -> int:
    if micro_batches_in_flight > 0:
        return max(1, min(m, micro_batches_in_flight))
    if name == "gpipe":
        return m
    if name == "1f1b":
        return max(1, min(m, p - rank))
    return max(1, min(m, 2 * p))


def _priority(name: str, rank: int, op: Op, p: int) -> tuple:
    chunk = chunk_of(rank, op.piece, p)
    if name == "gpipe":
        return (op.kind == "B", op.mb, chunk)
    if name == "1f1b":
        return (op.kind == "F", op.mb, -chunk)
    # v: backward first (deeper chunk first: up before down), then forwards that finish a micro-batch
    return (op.kind == "F", -chunk, op.mb)


def build_schedule(name: str, p: int, m: int, micro_batches_in_flight: int = 0) -> list[list[Op]]:
    """The per-rank op lists of schedule `name` for p ranks and m micro-batches."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {name!r} (known: {list(SCHEDULES)})")
    if p < 2 or m < 1:
        raise ValueError(f"a pipeline needs p >= 2 ranks and m >= 1 micro-batches, got p={p}, m={m}")
    todo = [{Op(k, piece, i) for piece in pieces(r, p) for k in "FB" for i in range(m)} for r in range(p)]
    caps = [in_flight_cap(name, r, p, m, micro_batches_in_flight) for r in range(p)]
    first_piece = ["turn" if r == p - 1 else "down" for r in range(p)]
    last_b = ["turn" if r == p - 1 else "down" for r in range(p)]
    finish: dict[tuple[int, Op], float] = {}
    free_at = [0.0] * p
    started = [0] * p
    ended = [0] * p
    orders: list[list[Op]] = [[] for _ in range(p)]
    now = 0.0
    while any(todo):
        progressed = False
        for r in range(p):
            if free_at[r] > now or not todo[r]:
                continue
            ready = []
            for op in todo[r]:
                if any(finish.get(d, float("inf")) > now for d in dependencies(r, op, p)):
                    continue
                if op.kind == "F" and op.piece == first_piece[r] and started[r] - ended[r] >= caps[r]:
                    continue
                ready.append(op)
            if not ready:
                continue
            op = min(ready, key=lambda o: _priority(name, r, o, p))
            todo[r].remove(op)
            orders[r].append(op)
            finish[(r, op)] = now + cost(op)
            free_at[r] = finish[(r, op)]
            started[r] += op.kind == "F" and op.piece == first_piece[r]
            ended[r] += op.kind == "B" and op.piece == last_b[r]
            progressed = True
        future = [t for t in free_at if t > now] + [t for t in finish.values() if t > now]
        if not future and not progressed:
            raise RuntimeError(f"schedule {name} p={p} m={m} is stuck: {[sorted(t) for t in todo]}")
        if future:
            now = min(future)
    return orders


@dataclass
class SimResult:
    makespan: float
    busy: list[float]
    idle: list[float]

    @property
    def bubble(self) -> list[float]:
        """Share of the step each rank waits."""
        return [i / self.makespan for i in self.idle]

    @property
    def mean_bubble(self) -> float:
        return sum(self.idle) / (len(self.idle) * self.makespan)


def simulate(orders: list[list[Op]], p: int, op_cost=cost) -> SimResult:
    """Runs fixed per-rank orders with the given op costs: each rank executes its list in order,
    an op starting when its inputs are there. Raises RuntimeError on a deadlock, or when an op is
    missing, repeated, or needs a message nobody sends."""
    m = 1 + max(op.mb for ops in orders for op in ops)
    for r, ops in enumerate(orders):
        expected = {Op(k, piece, i) for piece in pieces(r, p) for k in "FB" for i in range(m)}
        if len(ops) != len(set(ops)) or set(ops) != expected:
            raise RuntimeError(f"rank {r}: ops missing or repeated: {sorted(set(expected) ^ set(ops))}")
    sent = {msg for r, ops in enumerate(orders) for op in ops for msg in messages_sent(r, op, p)}
    needed = {msg for r, ops in enumerate(orders) for op in ops for msg in messages_needed(r, op, p)}
    if sent != needed:
        raise RuntimeError(f"messages do not pair up: sent, never needed {sorted(sent - needed, key=str)}; "
                           f"needed, never sent {sorted(needed - sent, key=str)}")
    pos = [0] * p
    t = [0.0] * p
    busy = [0.0] * p
    finish: dict[tuple[int, Op], float] = {}
    remaining = sum(len(o) for o in orders)
    while remaining:
        moved = False
        for r in range(p):
            while pos[r] < len(orders[r]):
                op = orders[r][pos[r]]
                deps = dependencies(r, op, p)
                if any(d not in finish for d in deps):
                    break
                start = max([t[r]] + [finish[d] for d in deps])
                c = op_cost(op) if op_cost is cost else op_cost(r, op)
                finish[(r, op)] = t[r] = start + c
                busy[r] += c
                pos[r] += 1
                remaining -= 1
                moved = True
        if not moved:
            waiting = {r: str(orders[r][pos[r]]) for r in range(p) if pos[r] < len(orders[r])}
            raise RuntimeError(f"deadlock: ranks wait on {waiting}")
    makespan = max(t)
    return SimResult(makespan, busy, [makespan - b for b in busy])


def send_order(orders: list[list[Op]], p: int, src: int, dst: int) -> list[Message]:
    """The messages `src` sends to `dst` in one step, in the order it sends them: the order in
    which `dst` posts its receives (what NCCL's in-order matching of point-to-point needs)."""
    return [msg for op in orders[src] for msg in messages_sent(src, op, p) if msg.dst == dst]


def theoretical_bubble(name: str, p: int, m: int, micro_batches_in_flight: int = 0) -> float:
    """Mean waiting share of the schedule at unit costs (forward 1, backward 2 per chunk)."""
    return simulate(build_schedule(name, p, m, micro_batches_in_flight), p).mean_bubble
