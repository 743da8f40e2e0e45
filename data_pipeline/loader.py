"""BalancedStepLoader: one optimizer step of packed, balanced micro-batches per iteration.

Per step, on every data-parallel rank:
 1. pull documents from this rank's streams (round-robin over its workers, from stream 0 each
    round) until its share of the step's byte target is reached or its streams end the epoch;
 2. all_gather_object the pulled documents (and stream positions) over the gloo group, so every
    rank holds the same global window: the carried-over pieces first, then every rank's documents
    in rank order; more rounds while the target is not reached and some rank still has data, the
    epoch moving on (all ranks together) when every stream has ended it;
 3. partition the window with greedy LPT into dp_world x M micro-batches of at most
    micro_batch_bytes, near-equal cost per rank (the same computation on every rank);
 4. pack this rank's M micro-batches; what did not fit is carried into the next step.
The state (epoch, every stream's plan and position, the carry, skip counts, the cost model) is
known to every rank after each gather, so state_dict() is identical everywhere and needs no
communication. With dp_world == 1 no torch.distributed call is made.
"""
from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field

from .balance import ByteCost, imbalance, plan_step, round_robin_costs
from .batch import MicroBatch
from .index import load_indexes
from .packer import Piece, pack_row, split_piece
from .reader import StreamClient, fresh_plans, replan
from .tario import DataError

log = logging.getLogger("data_pipeline")

STATE_FORMAT = "hnet-loader/1"
_WORLD_GLOO_GROUP = None


@dataclass
class StepBatch:
    """One optimizer step for this rank.

    micro_batches:  the same count on every rank (>= 1).
    global_targets: target bytes in the step over all ranks (the token-weighted loss denominator).
    global_bytes:   real positions (BOS + document bytes) in the step over all ranks.
    rank_bytes / rank_cost: per data-parallel rank, for the balance metrics.
    """

    micro_batches: list[MicroBatch]
    global_targets: int
    global_bytes: int
    metrics: dict[str, float]
    epoch: int = 0
    step: int = 0
    rank_bytes: list[int] = field(default_factory=list)
    rank_cost: list[float] = field(default_factory=list)


def _shards_fingerprint(shards) -> str:
    h = hashlib.sha256()
    for s in shards:
        h.update(f"{s.name}\t{s.samples}\n".encode())
    return h.hexdigest()[:16]


class BalancedStepLoader:
    """Iterating yields StepBatch; the contract is in data_pipeline/README.md. Beyond it:

    lookahead:          extra share of the step's capacity pulled so the partition can fill the
                        micro-batches and balance cost (the surplus is carried, never lost).
    restart_split_docs: the parts of a cut document each start with BOS and have no target across
                        the cut (default: continuations have no BOS, targets run across the cut).
    prefetch:           event batches (up to 64 documents / 1 MB each) a worker may read ahead.
    shared_memory:      workers hand documents over in shared memory (Linux memfd); when False,
                        pickled through the pipe: the same stream, more CPU in this process.
    Workers are fresh interpreters (fork + exec), never a fork of this possibly threaded process.
    per_rank:           micro-batches per rank per step, ceil(step_bytes / (dp_world x micro_batch_bytes));
                        fewer only in the last step of a finite run.
    """

    def __init__(self, index_paths: list[str], micro_batch_bytes: int, step_bytes: int,
                 dp_rank: int = 0, dp_world: int = 1, num_workers: int = 0, seed: int = 0,
                 cost_model=None, on_error: str = "skip", round_to: int = 1,
                 epochs: int | None = None, group=None, lookahead: float = 0.25,
                 restart_split_docs: bool = False, prefetch: int = 8, shared_memory: bool = True,
                 allow_pipe_urls: bool = False):
        if on_error not in ("skip", "fail"):
            raise ValueError(f"on_error must be 'skip' or 'fail', got {on_error!r}")
        if round_to < 1 or micro_batch_bytes % round_to:
            raise ValueError(f"micro_batch_bytes ({micro_batch_bytes}) must be a multiple of round_to ({round_to})")
        if micro_batch_bytes < 2 or step_bytes < 1:
            raise ValueError("micro_batch_bytes must be >= 2 and step_bytes >= 1")
        if not 0 <= dp_rank < dp_world:
            raise ValueError(f"dp_rank {dp_rank} outside dp_world {dp_world}")
        if epochs is not None and epochs < 1:
            raise ValueError("epochs must be None (infinite) or >= 1")
        self.shards = load_indexes(list(index_paths), allow_pipe_urls)
        self.capacity = micro_batch_bytes
        self.step_bytes = step_bytes
        self.rank, self.world = dp_rank, dp_world
        self.workers = num_workers
        self.streams_per_rank = max(1, num_workers)
        self.n_streams = dp_world * self.streams_per_rank
        self.seed, self.epochs, self.on_error = seed, epochs, on_error
        self.round_to, self.lookahead = round_to, lookahead
        self.restart_split_docs = restart_split_docs
        self.cost_model = cost_model if cost_model is not None else ByteCost()
        self.per_rank = max(1, math.ceil(step_bytes / (dp_world * micro_batch_bytes)))
        self.prefetch, self.shared_memory = prefetch, shared_memory
        self.min_gap_fill = 32  # positions: smaller gaps are not worth a cut
        self._group = self._resolve_group(group) if dp_world > 1 else None
        self._fingerprint = _shards_fingerprint(self.shards)
        if self.n_streams > len(self.shards):
            log.warning("%d shards for %d readers (dp_world x workers): %d readers stay idle; "
                        "write smaller shards", len(self.shards), self.n_streams, self.n_streams - len(self.shards))
        self._clients: list[StreamClient] = []
        self._reset_state()

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self.epoch = 0
        self.plans = fresh_plans(len(self.shards), self.seed, 0, self.n_streams)
        self.positions = [[0, 0] for _ in range(self.n_streams)]
        self.carry: list[Piece] = []
        self.finished = False
        self.steps = 0
        self.skipped_docs = 0
        self.skipped_shards = 0
        self.epoch_docs = 0

    def state_dict(self) -> dict:
        """Rank-independent, picklable: every rank returns the same dict."""
        return {
            "format": STATE_FORMAT, "shards": self._fingerprint, "seed": self.seed,
            "epoch": self.epoch, "n_streams": self.n_streams,
            "plans": [[list(w) for w in p] for p in self.plans],
            "positions": [list(p) for p in self.positions],
            "carry": [(p.key, p.data, p.bos, p.next_byte) for p in self.carry],
            "finished": self.finished, "steps": self.steps, "epoch_docs": self.epoch_docs,
            "skipped_docs": self.skipped_docs, "skipped_shards": self.skipped_shards,
            "cost_model": self.cost_model.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Before iterating. Another dp_world or num_workers re-deals the epoch's unread work."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a BalancedStepLoader state (format {state.get('format')!r})")
        if state["shards"] != self._fingerprint:
            raise ValueError("loader state was saved for a different shard list (index files changed); "
                             "refusing to resume, it would repeat or skip documents")
        if state["seed"] != self.seed:
            raise ValueError(f"loader state was saved with seed {state['seed']}, this loader has {self.seed}")
        self._close_streams()
        self.epoch = state["epoch"]
        plans = [[list(w) for w in p] for p in state["plans"]]
        positions = [list(p) for p in state["positions"]]
        if state["n_streams"] != self.n_streams:
            log.info("resuming %d streams as %d: re-dealing the unread shards of epoch %d",
                     state["n_streams"], self.n_streams, self.epoch)
            plans, positions = replan(plans, positions, self.shards, self.seed, self.epoch, self.n_streams)
        self.plans, self.positions = plans, positions
        self.carry = [Piece(*c) for c in state["carry"]]
        self.finished = state["finished"]
        self.steps = state["steps"]
        self.epoch_docs = state["epoch_docs"]
        self.skipped_docs, self.skipped_shards = state["skipped_docs"], state["skipped_shards"]
        self.cost_model.load_state_dict(state["cost_model"])

    # ------------------------------------------------------------------ streams

    def _local_streams(self) -> range:
        return range(self.rank * self.streams_per_rank, (self.rank + 1) * self.streams_per_rank)

    def _start_streams(self) -> list[StreamClient]:
        self._close_streams()
        self._exhausted = {}
        for s in self._local_streams():
            args = dict(shards=self.shards, plan=self.plans[s], position=list(self.positions[s]),
                        epoch=self.epoch, seed=self.seed, stream=s, n_streams=self.n_streams,
                        epochs=self.epochs, on_error=self.on_error)
            self._clients.append(StreamClient(args, self.workers > 0, self.prefetch, self.shared_memory))
            self._exhausted[s] = False
        return self._clients

    def _close_streams(self) -> None:
        for c in self._clients:
            c.request_stop()
        for c in self._clients:
            c.close()
        self._clients = []

    def close(self) -> None:
        self._close_streams()

    def __del__(self):
        try:
            self._close_streams()
        except Exception:
            pass

    def _pull(self, quota: int) -> tuple[list[Piece], int, int]:
        """Documents from this rank's streams until `quota` positions; returns (pieces, skips, shard skips)."""
        out, got, skips, shard_skips = [], 0, 0, 0
        local = list(self._local_streams())
        while got < quota:
            progressed = False
            for s, client in zip(local, self._clients):
                if got >= quota:
                    break
                if self._exhausted[s]:
                    continue
                ev = client.next()
                progressed = True
                kind = ev[0]
                if kind != "end" and ev[1] != self.epoch:  # streams never run ahead of the global epoch
                    raise RuntimeError(f"stream {s} delivered epoch {ev[1]} during epoch {self.epoch}")
                if kind == "doc":
                    _, ep, k, pos, key, data = ev
                    self.positions[s] = [k, pos + 1]
                    for p in split_piece(Piece(key, data), self.capacity, self.restart_split_docs):
                        out.append(p)
                        got += p.length
                elif kind == "skip":
                    _, ep, k, pos, msg = ev
                    self.positions[s] = [k, pos + 1]
                    skips += 1
                    log.warning("skipped document: %s", msg)
                elif kind == "shard_skip":
                    _, ep, k, msg = ev
                    self.positions[s] = [k + 1, self.plans[s][k + 1][1] if k + 1 < len(self.plans[s]) else 0]
                    shard_skips += 1
                    log.warning("skipped shard: %s", msg)
                else:  # epoch_end / end
                    self.positions[s] = [len(self.plans[s]), 0]
                    self._exhausted[s] = True
            if not progressed:
                break
        return out, skips, shard_skips

    # ------------------------------------------------------------------ collectives

    def _resolve_group(self, group):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("dp_world > 1 needs torch.distributed initialised (the gathers run over gloo)")
        if group is None:
            # documents are Python objects: gather them over gloo even when training uses NCCL;
            # and a group of the loaders' own even under gloo, so a loader building a step in a
            # background thread (data_pipeline.prefetch) never shares a group with the training's
            # collectives. One group per process (creating a group is collective; eval loaders
            # come and go)
            global _WORLD_GLOO_GROUP
            if _WORLD_GLOO_GROUP is None:
                _WORLD_GLOO_GROUP = dist.new_group(backend="gloo")
            group = _WORLD_GLOO_GROUP
        size = dist.get_world_size(group)
        if size != self.world:
            raise ValueError(f"dp_world={self.world} but the gather group has {size} ranks")
        return group

    def _gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self._group)
        return out

    # ------------------------------------------------------------------ steps

    def __iter__(self):
        """Steps from the current state on. One iteration at a time: starting a new one (or
        load_state_dict) stops the previous iteration's readers; the new one continues exactly
        where the consumed steps left off."""
        clients = self._start_streams()
        try:
            while True:
                if self._clients is not clients:
                    raise RuntimeError("this iteration was superseded by a newer iter() or load_state_dict()")
                step = self._next_step()
                if step is None:
                    return
                yield step
        finally:
            for c in clients:
                c.request_stop()
            for c in clients:
                c.close()
            if self._clients is clients:
                self._clients = []

    def _fill_window(self) -> tuple[list[Piece], bool]:
        """The global window for one step (identical on all ranks) and whether the data has ended."""
        capacity = self.world * self.per_rank * self.capacity
        window = list(self.carry)
        need = int(capacity * (1 + self.lookahead)) - sum(p.length for p in window)
        alive = [True] * self.world
        if self.finished:
            return window, True
        while need > 0:
            n_alive = sum(alive)
            quota = math.ceil(need / n_alive) if alive[self.rank] else 0
            payload = {"error": None}
            try:
                pieces, skips, shard_skips = self._pull(quota)
                payload.update(pieces=pieces, skips=skips, shard_skips=shard_skips,
                               done=all(self._exhausted.values()),
                               positions=[self.positions[s] for s in self._local_streams()])
            except (DataError, RuntimeError) as e:
                payload["error"] = str(e)  # told to every rank, so none waits in a gather forever
            if self.rank == 0:
                payload["cost_model"] = self.cost_model.state_dict()
            gathered = self._gather(payload)
            errors = [(r, g["error"]) for r, g in enumerate(gathered) if g["error"]]
            if errors:
                r, msg = errors[0]
                raise DataError(f"data error on dp rank {r}: {msg}")
            self.cost_model.load_state_dict(gathered[0]["cost_model"])
            for r, g in enumerate(gathered):
                for s, pos in zip(range(r * self.streams_per_rank, (r + 1) * self.streams_per_rank),
                                  g["positions"]):
                    self.positions[s] = list(pos)
                self.skipped_docs += g["skips"]
                self.skipped_shards += g["shard_skips"]
                for p in g["pieces"]:
                    window.append(p)
                    need -= p.length
                    self.epoch_docs += p.bos
                alive[r] = not g["done"]
            if need <= 0 or any(alive):
                continue
            # every stream has ended this epoch
            if self.epoch_docs == 0:
                raise DataError(f"epoch {self.epoch} produced no readable document "
                                f"({self.skipped_shards} shards and {self.skipped_docs} documents skipped so far)")
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                self.finished = True
                return window, True
            self.epoch += 1
            self.epoch_docs = 0
            self.plans = fresh_plans(len(self.shards), self.seed, self.epoch, self.n_streams)
            self.positions = [[0, 0] for _ in range(self.n_streams)]
            for s in self._local_streams():
                self._exhausted[s] = False  # the streams already read on into the fresh plan
            alive = [True] * self.world
        return window, False

    def _next_step(self) -> StepBatch | None:
        window, ended = self._fill_window()
        if ended and not window:
            return None
        n_prio = len(self.carry)
        plan = plan_step(window, n_prio, self.world, self.per_rank, self.capacity, self.cost_model,
                         ended, self.restart_split_docs, self.min_gap_fill)
        window, sizes, costs, part, per_rank = plan.window, plan.sizes, plan.costs, plan.part, plan.per_rank
        R, C = self.world, self.capacity
        self.carry = [window[i] for i in part.unplaced]
        mine = [pack_row([window[i] for i in b], C, self.round_to) for b in part.rank_bins(self.rank)]
        placed = [i for b in part.bins for i in b]
        global_bytes = sum(sizes[i] for i in placed)
        global_targets = sum(window[i].n_targets for i in placed)
        rr = round_robin_costs([costs[i] for i in sorted(placed)], R)
        mean_b = sum(part.rank_bytes) / R
        metrics = {
            "data/packing_efficiency": global_bytes / (R * per_rank * C),
            "data/imbalance": imbalance(part.rank_cost),
            "data/imbalance_round_robin": imbalance(rr),
            "data/imbalance_bytes": max(part.rank_bytes) / mean_b if mean_b else 1.0,
            "data/bytes_rank_max": float(max(part.rank_bytes)),
            "data/bytes_rank_min": float(min(part.rank_bytes)),
            "data/bytes_rank_mean": mean_b,
            "data/cost_rank_max": max(part.rank_cost),
            "data/cost_rank_mean": sum(part.rank_cost) / R,
            "data/micro_batches": float(per_rank),
            "data/pieces": float(len(placed)),
            "data/carry_bytes": float(sum(p.length for p in self.carry)),
            "data/epoch": float(self.epoch),
            "data/skipped_docs": float(self.skipped_docs),
            "data/skipped_shards": float(self.skipped_shards),
        }
        self.steps += 1
        return StepBatch(mine, global_targets, global_bytes, metrics, self.epoch, self.steps,
                         list(part.rank_bytes), list(part.rank_cost))
