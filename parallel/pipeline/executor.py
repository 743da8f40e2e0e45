"""PipelineStep: one optimizer step of an H-Net split along its hierarchy over pipeline ranks,
each rank one DeepSpeed ZeRO-3 engine sharded over the replicas of its stage.

Per step, every rank runs its list of the schedule (schedule.py) in order: forwards and
backwards of its pieces (stage.py), waiting only for the tensors its neighbours hand over
(p2p.py). The gradients:

- rank 0's up piece ends in the loss: its backward is the token-weighted loss backward, exactly
  as the data-parallel step (parallel/step.py): summed cross-entropy x DP / global targets;
- every other piece backwards the gradient it received applied to its output, through the
  surrogate sum(output * received gradient) (`engine.backward` wants a scalar). The gradient
  accumulation count stays 1, the boundary is set before this rank's last backward of the step,
  and `scale_wrt_gas=False`, so DeepSpeed scales nothing: the weighting is applied once, on rank 0;
- on each rank the hand-off from its encoders to its decoders (the residual and the boundary
  probabilities that dechunk and the confidence STE use) never leaves the rank; it is detached
  at the boundary between the two pieces, and the down piece's backward runs once with the
  gradients from the rank below and those its own decoders left on the detached copies;
- the ratio loss (eq. 10 of the H-Net paper) of each routing level is added on the rank that
  holds the level, to the backward of the piece that computed its routing, scaled 1 / (micro-
  batches of the step) as in the data-parallel step.

ZeRO-3 copies, instead of adding, a gradient partition while its micro-step counter is 0, and
moves the counter only at the next engine forward (deepspeed/runtime/zero/stage3.py). A rank
here runs the backward of one micro-batch's up piece and, later, the down piece with forwards
of other micro-batches between them or not, so the first backward that touches a parameter may
see any counter value: the first touch of a step would add onto the previous step's gradients,
or a later one overwrite this step's. At the start of every step the partitioned gradient buffer
is zeroed and the counter set to 1, so every backward adds (`zero3_accumulate_fix`); the
3-step equivalence test fails without it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from parallel.distributed import all_reduce_sum
from parallel.step import EngineExecutor, _Accumulator, _n_real, _to
from pretrain.model.dynamic_chunking import RoutingOutput
from pretrain.model.hnet import (LevelContext, check_inputs, next_byte_loss, stage_statistics,
                                 weighted_ratio_loss)
from pretrain.model.sequence import PackedSeqs

from .p2p import Mailbox, Outbox, connect
from .schedule import Message, build_schedule, send_order, simulate


@dataclass
class RemoteStep:
    """What a pipeline rank without data knows of a step: how many micro-batches, the global counts."""

    micro_batches: list
    global_targets: int
    global_bytes: int
    metrics: dict = field(default_factory=dict)


def detached_context(ctx: LevelContext) -> tuple[LevelContext, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The skip context with its differentiable tensors replaced by leaves; returns the pairs
    (original, leaf) whose leaf gradients go into the original's backward later."""
    pairs = []

    def leaf(t: torch.Tensor) -> torch.Tensor:
        if not t.requires_grad:
            return t
        copy = t.detach().requires_grad_(True)
        pairs.append((t, copy))
        return copy

    r = ctx.routing
    routing = r._replace(boundary_prob=leaf(r.boundary_prob), selected_probs=leaf(r.selected_probs))
    return ctx._replace(residual=leaf(ctx.residual), routing=routing), pairs


class PipelineStep(EngineExecutor):
    zero3_accumulate_fix = True  # see the module docstring (off only to show the trap in a test)

    def __init__(self, engine, stage_module, grid, schedule: str = "v", micro_batches_in_flight: int = 0):
        self.engine, self.stage_module, self.grid = engine, stage_module, grid
        self.config = stage_module.config
        self.n_stages = self.config.num_stages
        self.device = engine.device
        self.me, self.p = grid.stage, grid.pp
        self.dp_rank, self.dp_world = grid.dp_rank, grid.dp
        self.data_group = grid.data_group
        self.reads_data = grid.is_first
        self.schedule, self.in_flight = schedule, micro_batches_in_flight
        self.first_level = stage_module.first_level
        self._orders: dict = {}
        self.rank = grid.rank
        connect(self.rank, [grid.rank_of(nb) for nb in (self.me - 1, self.me + 1) if 0 <= nb < self.p],
                grid.p2p_group, self.device)

    # ------------------------------------------------------------------ data
    def batches(self, loader):
        """Rank 0 of each pipeline reads the data and tells its pipeline how many micro-batches
        each step has (a count of -1: the data has ended); the other ranks get `RemoteStep`s."""
        src, group = self.grid.rank_of(0), self.grid.pipe_group
        header = torch.zeros(3, dtype=torch.int64, device=self.device if dist.get_backend() == "nccl" else "cpu")
        if self.reads_data:
            for batch in loader:
                header.copy_(torch.tensor([len(batch.micro_batches), batch.global_targets, batch.global_bytes]))
                dist.broadcast(header, src=src, group=group)
                yield batch
            header.fill_(-1)
            dist.broadcast(header, src=src, group=group)
            return
        while True:
            dist.broadcast(header, src=src, group=group)
            # a host read of the received header (the broadcast has delivered it): the step's size
            # is needed on the host to run the schedule; once per step, p2p metadata
            n, targets, n_bytes = header.tolist()
            if n < 0:
                return
            yield RemoteStep([None] * n, targets, n_bytes)

    # ------------------------------------------------------------------ one step
    def _orders_for(self, name: str, n: int) -> list:
        key = (name, n)
        if key not in self._orders:
            self._orders[key] = build_schedule(name, self.p, n, self.in_flight)
        return self._orders[key]

    def _mailboxes(self, orders, kinds: tuple[str, ...]) -> dict[int, Mailbox]:
        boxes = {}
        for nb in (self.me - 1, self.me + 1):
            if 0 <= nb < self.p:
                expected = [m for m in send_order(orders, self.p, nb, self.me) if m.kind in kinds]
                src = self.grid.rank_of(nb)
                boxes[nb] = Mailbox(src, expected, self.grid.p2p_group(src, self.rank), self.device)
        return boxes

    def _begin_accumulation(self) -> None:
        opt = self.engine.optimizer
        buf = getattr(opt, "grad_partitions_flat_buffer", None)
        if self.zero3_accumulate_fix and buf is not None:
            buf.zero_()
            opt.micro_step_id = 1

    def train_step(self, batch, inject_nan: bool = False):
        n = len(batch.micro_batches)
        orders = self._orders_for(self.schedule, n)
        mine = orders[self.me]
        last_backward = max(i for i, op in enumerate(mine) if op.kind == "B")
        run = _StepRun(self, batch, train=True, inject_nan=inject_nan,
                       mailboxes=self._mailboxes(orders, ("act_down", "act_up", "grad_up", "grad_down")))
        self.engine.train()
        self._begin_accumulation()
        self.engine.set_gradient_accumulation_boundary(False)
        t0 = time.perf_counter()
        for i, op in enumerate(mine):
            if i == last_backward:
                self.engine.set_gradient_accumulation_boundary(True)
            getattr(run, f"{op.kind}_{op.piece}")(op.mb)
        run.check_all_taken()
        run.outbox.wait_all()
        step_s = time.perf_counter() - t0
        if self.before_step is not None:
            self.before_step(self)
        self.engine.step()
        (grad_norm,) = run.acc.read(self.engine.get_global_grad_norm())  # with the statistics: one read
        res = run.acc.reduce(grad_norm)
        res.extra_metrics = self._pipeline_metrics(run, step_s, orders)
        return res

    def _pipeline_metrics(self, run, step_s: float, orders) -> dict[str, float]:
        """perf/bubble/rank{k}: the measured share of rank k's step spent waiting for its
        neighbours (mean over data-parallel replicas), beside the schedule's at unit costs."""
        wait = sum(b.wait_s for b in run.mailboxes.values())
        vec = [0.0] * (2 * self.p)
        vec[self.me] = wait / max(1e-9, step_s) / self.dp_world
        vec[self.p + self.me] = float(run.outbox.bytes_sent)
        tot = all_reduce_sum(vec)
        out = {f"perf/bubble/rank{k}": tot[k] for k in range(self.p)}
        out["perf/bubble_theory"] = simulate(orders, self.p).mean_bubble
        out["perf/pipeline_bytes_sent"] = sum(tot[self.p:])
        return out

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def eval_step(self, batch) -> list:
        """Forward-only over the pipeline; rank 0 returns (micro-batch, full model output) with
        the routing statistics of every stage (the deeper ranks send their boundaries up)."""
        orders = [[op for op in ops if op.kind == "F"] for ops in self._orders_for("gpipe", len(batch.micro_batches))]
        run = _StepRun(self, batch, train=False, inject_nan=False, mailboxes=self._mailboxes(orders, ("act_down",
                                                                                                       "act_up")))
        for op in orders[self.me]:
            getattr(run, f"F_{op.piece}")(op.mb)
        run.check_all_taken()
        run.outbox.wait_all()
        return run.outputs

    # ------------------------------------------------------------------ checkpoints
    def _tag(self) -> str:
        return f"pipe{self.me}"

    def save(self, ckpt_dir: str, tag: str, client_state: dict) -> None:
        import os

        self.engine.save_checkpoint(os.path.join(ckpt_dir, tag), tag=self._tag(), client_state=client_state,
                                    save_latest=False)

    def load(self, ckpt_dir: str, tag: str, universal: bool = False) -> dict:
        import os

        cfg = self.engine._config
        before = cfg.load_universal_checkpoint
        cfg.load_universal_checkpoint = universal
        try:
            path, client = self.engine.load_checkpoint(os.path.join(ckpt_dir, tag), tag=self._tag(),
                                                       load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            cfg.load_universal_checkpoint = before
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load pipeline stage {self.me} of checkpoint {ckpt_dir}/{tag}")
        return client or {}


class _StepRun:
    """The state of one step's pieces on one rank, keyed by micro-batch."""

    def __init__(self, ex: PipelineStep, batch, train: bool, inject_nan: bool, mailboxes: dict):
        self.ex, self.batch, self.train, self.inject_nan = ex, batch, train, inject_nan
        self.n = len(batch.micro_batches)
        self.mailboxes = mailboxes
        self.outbox = Outbox(lambda dst: ex.grid.p2p_group(ex.rank, dst), ex.device)
        self.acc = _Accumulator(ex.n_stages)
        self.weight = ex.dp_world / max(1, int(batch.global_targets))
        self.down, self.up, self.turn = {}, {}, {}
        self.outputs: list = []

    # ---------------------------------------------------------------- plumbing
    def check_all_taken(self) -> None:
        """Every message a neighbour sent this step was received: one left on its stream would
        hold that neighbour's sends (p2p.py), so a schedule and its pieces that disagree fail here."""
        for src, box in self.mailboxes.items():
            if not box.done():
                left = box.expected[box.next:] + list(box.arrived)
                raise RuntimeError(f"pipeline rank {self.ex.me}: messages from stage {src} not taken this step: "
                                   f"{left[:4]}")

    def recv(self, src: int, kind: str, i: int) -> list[torch.Tensor]:
        return self.mailboxes[src].get(Message(src, self.ex.me, kind, i))

    def send(self, dst: int, tensors: list[torch.Tensor]) -> None:
        self.outbox.send(self.ex.grid.rank_of(dst), tensors)

    def _meta(self, n_real, n_bytes, bpc) -> torch.Tensor:
        """[real positions (-1: all), real bytes, bytes per chunk] for the next rank; the bytes per
        chunk is a device tensor (the product of this rank's compression ratios): it is sent, not read."""
        dev = self.ex.device

        def entry(v) -> torch.Tensor:
            return v.reshape(1).to(dev, torch.float64) if torch.is_tensor(v) else torch.tensor([float(v)],
                                                                                               dtype=torch.float64).to(dev)

        return torch.cat([entry(-1.0 if n_real is None else n_real), entry(n_bytes), entry(bpc)])

    @staticmethod
    def _received_meta(meta: torch.Tensor):
        """n_real, n_bytes, bytes per chunk of a received meta: n_real sizes slices on the host, a
        read of a tensor the mailbox has already waited for; the other two stay on the device."""
        n = int(meta[0])
        return (None if n < 0 else n), meta[1], meta[2]

    def _stats(self, routing, n_real, bpc_in: float, n_bytes: float, like: torch.Tensor, keys=()):
        """Routing statistics of this rank's levels -> (ratio objective, real positions and bytes
        per chunk after them)."""
        stats, n_next = stage_statistics(self.ex.config, list(routing), n_real, self.ex.first_level)
        ratio = weighted_ratio_loss(self.ex.config, stats, like)
        bpc_out = self.acc.add_levels(self.ex.first_level, stats, bpc_in, n_bytes)
        self.acc.add_ratio(ratio, keys)
        return ratio / self.n, n_next, bpc_out

    @staticmethod
    def _routing_tensors(routing) -> list[torch.Tensor]:
        return [t for r in routing for t in (r.boundary_mask, r.boundary_prob.float())]

    # ---------------------------------------------------------------- forwards
    def F_down(self, i: int) -> None:
        ex = self.ex
        if ex.reads_data:
            mb = self.batch.micro_batches[i]
            ids, labels, cu = _to(mb, ex.device)
            seqs = check_inputs(ex.config, ids, cu, labels)
            x, n_real, n_bytes, bpc_in = ids, _n_real(mb), float(mb.n_bytes), 1.0
            self.down[i] = {"labels": labels, "shape": ids.shape, "mb": mb}
        else:
            x, cu, meta = self.recv(ex.me - 1, "act_down", i)
            x.requires_grad_(self.train)
            seqs = PackedSeqs.from_cu_seqlens(cu)  # one read of the received boundaries: they size this level
            n_real, n_bytes, bpc_in = self._received_meta(meta)
            self.down[i] = {"x": x}
        out, next_seqs, contexts = ex.engine("down", x, seqs)
        keys = self.down[i]["mb"].keys if ex.reads_data else ()
        ratio, n_next, bpc = self._stats([c.routing for c in contexts], n_real, bpc_in, n_bytes, out, keys)
        self.down[i].update(out=out, contexts=contexts, ratio=ratio, n_real=n_real)
        self.send(ex.me + 1, [out, next_seqs.cu_seqlens.to(torch.int32), self._meta(n_next, n_bytes, bpc)])

    def F_turn(self, i: int) -> None:
        ex = self.ex
        x, cu, meta = self.recv(ex.me - 1, "act_down", i)
        x.requires_grad_(self.train)
        n_real, n_bytes, bpc_in = self._received_meta(meta)
        out, routing = ex.engine("turn", x, PackedSeqs.from_cu_seqlens(cu))  # one read: the boundaries size it
        ratio, _, _ = self._stats(routing, n_real, bpc_in, n_bytes, out)
        self.turn[i] = {"x": x, "out": out, "ratio": ratio}
        extra = [] if self.train else self._routing_tensors(routing)
        self.send(ex.me - 1, [out, *extra])

    def F_up(self, i: int) -> None:
        ex = self.ex
        y, *deeper = self.recv(ex.me + 1, "act_up", i)
        y.requires_grad_(self.train)
        st = self.down[i]
        contexts, pairs = st["contexts"], []
        if self.train:
            detached = [detached_context(c) for c in contexts]
            contexts, pairs = tuple(c for c, _ in detached), [pr for _, ps in detached for pr in ps]
        h = ex.engine("up", y, contexts)
        self.up[i] = {"y": y, "pairs": pairs}
        if not ex.reads_data:
            mine = [] if self.train else self._routing_tensors([c.routing for c in st["contexts"]])
            self.send(ex.me - 1, [h, *mine, *deeper])
            self.up[i]["out"] = h
            return
        out = next_byte_loss(h, st["shape"], st["labels"])
        mb = st["mb"]
        if not self.train:
            self._eval_output(out, mb, st, deeper)
            return
        loss_sum = out.loss_sum * float("nan") if self.inject_nan else out.loss_sum
        self.acc.add_loss(mb, loss_sum)
        self.up[i]["objective"] = loss_sum * self.weight

    def _eval_output(self, out, mb, st, deeper: list[torch.Tensor]) -> None:
        routing = [c.routing for c in st["contexts"]]
        for k in range(0, len(deeper), 2):
            mask, prob = deeper[k], deeper[k + 1]
            routing.append(RoutingOutput(prob, mask, prob))
        out.stages, _ = stage_statistics(self.ex.config, routing, st["n_real"])
        out.ratio_loss = weighted_ratio_loss(self.ex.config, out.stages, out.logits)
        self.outputs.append((mb, out))

    # ---------------------------------------------------------------- backwards
    def _backward(self, terms: list[torch.Tensor]) -> None:
        terms = [t for t in terms if t is not None and t.requires_grad]
        if terms:
            self.ex.engine.backward(torch.stack([t.reshape(()) for t in terms]).sum(), scale_wrt_gas=False)

    @staticmethod
    def _grad_of(x: torch.Tensor) -> torch.Tensor:
        return x.grad if x.grad is not None else torch.zeros_like(x)

    @staticmethod
    def _dot(out: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return (out.float() * grad.float()).sum()

    def B_up(self, i: int) -> None:
        ex, st = self.ex, self.up.pop(i)
        if ex.reads_data:
            self._backward([st["objective"]])
        else:
            (g,) = self.recv(ex.me - 1, "grad_up", i)
            self._backward([self._dot(st["out"], g)])
        self.send(ex.me + 1, [self._grad_of(st["y"])])
        self.down[i]["handoff"] = [(orig, copy.grad) for orig, copy in st["pairs"] if copy.grad is not None]

    def B_turn(self, i: int) -> None:
        ex, st = self.ex, self.turn.pop(i)
        (g,) = self.recv(ex.me - 1, "grad_up", i)
        self._backward([self._dot(st["out"], g), st["ratio"]])
        self.send(ex.me - 1, [self._grad_of(st["x"])])

    def B_down(self, i: int) -> None:
        ex, st = self.ex, self.down.pop(i)
        (g,) = self.recv(ex.me + 1, "grad_down", i)
        terms = [self._dot(st["out"], g), st["ratio"]] + [self._dot(o, gr) for o, gr in st.get("handoff", [])]
        self._backward(terms)
        if not ex.reads_data:
            self.send(ex.me - 1, [self._grad_of(st["x"])])
