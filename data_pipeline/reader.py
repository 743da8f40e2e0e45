"""Stateful shard reading: seeded shard order per epoch, split over streams, exact positions.

A *stream* is one sequential reader; there are dp_world x max(1, num_workers) of them, stream
s = dp_rank * workers + worker. Epoch e's shard order is a permutation seeded by (seed, e);
stream s reads order[s::n_streams] (its *plan*: a list of [shard id, start offset]). Inside a
shard, documents are read in a permutation seeded by (seed, e, shard id): no shuffle buffer, so a
position (plan entry, offset into that permutation) says exactly which documents were consumed.

A stream yields events, in order:
    ("doc", epoch, entry, offset, key, bytes)   a document
    ("skip", epoch, entry, offset, message)     a position without a usable document (skip policy)
    ("shard_skip", epoch, entry, message)       a whole shard unusable (skip policy)
    ("epoch_end", epoch)                        this stream has no more documents in `epoch`
    ("end",)                                    no more epochs (epochs limit)
and raises DataError under the fail policy. After "epoch_end" a stream goes on into the next
epoch with its fresh plan; the consumer decides when to read on (all ranks move epochs together).

Streams run in the main process (num_workers=0) or in worker processes that prefetch batches of
events (documents in shared-memory slots under fork, see _Slots; otherwise pickled into the
pipe, whose buffer then bounds the prefetch); the consumer tracks positions from the
events it has *consumed*, so prefetched events never count, and a resume restarts the workers at
the consumed positions.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import traceback
from collections import deque
from typing import Iterator

import numpy as np

from .index import ShardInfo
from .tario import DataError, iter_samples

log = logging.getLogger("data_pipeline")


def epoch_shard_order(n_shards: int, seed: int, epoch: int) -> list[int]:
    return np.random.default_rng([seed, epoch, 0]).permutation(n_shards).tolist()


def in_shard_permutation(n_samples: int, seed: int, epoch: int, shard_id: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch, 1, shard_id]).permutation(n_samples)


def fresh_plans(n_shards: int, seed: int, epoch: int, n_streams: int) -> list[list[list[int]]]:
    order = epoch_shard_order(n_shards, seed, epoch)
    return [[[sid, 0] for sid in order[s::n_streams]] for s in range(n_streams)]


def remaining_work(plans, positions, shards: list[ShardInfo], seed: int, epoch: int) -> list[list[int]]:
    """[shard id, offset] still to read in this epoch, in the epoch's shard order."""
    rank_in_order = {sid: i for i, sid in enumerate(epoch_shard_order(len(shards), seed, epoch))}
    out = []
    for plan, (entry, offset) in zip(plans, positions):
        for k in range(entry, len(plan)):
            sid, start = plan[k]
            off = offset if k == entry else start
            if off < shards[sid].samples:
                out.append([sid, max(off, start)])
    out.sort(key=lambda w: rank_in_order[w[0]])
    return out


def replan(plans, positions, shards, seed: int, epoch: int, n_streams: int):
    """New plans for another stream count: the unfinished work dealt round-robin (partly read
    shards keep their offsets, so no document of the epoch is repeated or skipped)."""
    work = remaining_work(plans, positions, shards, seed, epoch)
    new_plans = [work[s::n_streams] for s in range(n_streams)]
    new_positions = [[0, p[0][1] if p else 0] for p in new_plans]
    return new_plans, new_positions


def _load_shard(shard: ShardInfo, on_error: str) -> tuple[list, str | None]:
    """All samples of a shard (key, bytes|None) in tar order, and the problem that cut it short."""
    samples, problem = [], None
    try:
        for key, doc in iter_samples(shard.url, views=True):  # the shard held once; each document copied out when read
            samples.append((key, doc))
    except DataError as e:
        problem = str(e)
    if problem is None and len(samples) != shard.samples:
        problem = (f"shard {shard.name} holds {len(samples)} samples, its index says {shard.samples}"
                   f" (truncated, or changed after indexing)")
    if problem is not None and on_error == "fail":
        last = samples[-1][0] if samples else ""
        raise DataError(problem + (f" (last good key {last})" if last else ""), shard=shard.name, key=last)
    if problem is not None and len(samples) > shard.samples:
        log.warning("%s: using the first %d samples", problem, shard.samples)  # nothing lost: no skip events
    return samples[: shard.samples], problem


def iter_stream(shards: list[ShardInfo], plan, position, epoch: int, seed: int, stream: int,
                n_streams: int, epochs: int | None, on_error: str) -> Iterator[tuple]:
    """Events of one stream from `position` ([entry, offset] into `plan`) of `epoch` onwards."""
    entry, offset = position
    while epochs is None or epoch < epochs:
        for k in range(entry, len(plan)):
            sid, start = plan[k]
            shard = shards[sid]
            first = offset if k == entry else start
            if first >= shard.samples:
                continue
            samples = doc = None  # drop the previous shard before loading the next: one shard in memory
            samples, problem = _load_shard(shard, on_error)
            if not samples and problem is not None:
                yield ("shard_skip", epoch, k, problem)
                continue
            perm = in_shard_permutation(shard.samples, seed, epoch, sid)
            for pos in range(first, shard.samples):
                idx = int(perm[pos])
                if idx >= len(samples):
                    yield ("skip", epoch, k, pos, f"{problem}: sample #{idx} lost")
                    continue
                key, doc = samples[idx]
                if not doc:
                    why = "empty document" if doc is not None else "no .bin or .txt member"
                    if on_error == "fail":
                        raise DataError(f"shard {shard.name} key {key}: {why}", shard=shard.name, key=key)
                    yield ("skip", epoch, k, pos, f"shard {shard.name} key {key}: {why}")
                    continue
                yield ("doc", epoch, k, pos, f"{shard.name}:{key}", bytes(doc))
        yield ("epoch_end", epoch)
        epoch += 1
        plan = fresh_plans(len(shards), seed, epoch, n_streams)[stream]
        entry, offset = 0, 0
    yield ("end",)


# ------------------------------------------------------------------ worker processes

_BATCH_EVENTS = 64
_BATCH_BYTES = 1 << 20  # also the size of one shared-memory slot
_F_SETPIPE_SZ = 1031  # Linux fcntl: a larger pipe buffer is the prefetch depth of the pipe transport


class _Slots:
    """Shared memory between a worker and its consumer: `n` slots of _BATCH_BYTES, used in turn.

    A worker copies a batch's documents into the next slot and sends only the events (with
    (offset, length) in place of the bytes) over the pipe; the consumer copies the documents out
    and frees the slot. Pickling the documents through the pipe instead costs the consumer a
    read, a buffer copy and an unpickle per byte: with 2 workers on 2 cores that made the
    consumer the bottleneck. `free` counts free slots, so the slot count bounds the prefetch.
    Anonymous shared memory is inherited by fork only; other start methods use the pipe alone."""

    def __init__(self, ctx, n: int):
        import mmap

        self.n = n
        self.mem = mmap.mmap(-1, n * _BATCH_BYTES)
        self.free = ctx.Semaphore(n)
        self.consumer_pid = os.getpid()

    def acquire(self, stop) -> bool:
        """Wait for a free slot; False once the consumer has asked the worker to stop, or has died
        (killed, it never frees a slot nor sets `stop`: without this check the worker would wait
        forever as an orphan)."""
        while not self.free.acquire(timeout=0.2):
            if stop.is_set() or os.getppid() != self.consumer_pid:
                return False
        return True


def _send_batch(conn, batch: list, slots: _Slots | None, slot: int, stop) -> int:
    """Send one batch; returns the slot the next batch uses (-1: stop requested)."""
    if slots is None:
        conn.send((None, batch))
        return slot
    if stop.is_set():
        return -1
    base, off, out = slot * _BATCH_BYTES, 0, []
    for ev in batch:
        if ev[0] == "doc" and off + len(ev[5]) <= _BATCH_BYTES:
            n = len(ev[5])
            slots.mem[base + off:base + off + n] = ev[5]
            ev = ev[:5] + ((off, n),)
            off += n
        out.append(ev)  # a document larger than a slot travels in the pickle
    conn.send((slot, out))
    nxt = (slot + 1) % slots.n
    return nxt if slots.acquire(stop) else -1


def _worker_signals() -> None:
    """A worker ignores SIGTERM, SIGUSR1 and SIGINT: they are the consumer's business. SLURM sends
    SIGTERM (preemption with GraceTime, scancel) and SIGUSR1 (--signal with --full) to every
    process of the step, and Ctrl-C reaches the whole process group; the trainer answers them
    with a checkpoint, for which it still needs its data, so a worker must not die of them. The
    forked worker's inherited handler would only set a flag that nothing reads here. A worker
    ends when its consumer stops it, or goes away (EPIPE on the pipe, or a changed parent pid
    while it waits for a slot)."""
    import signal

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def _worker_main(args: dict, conn, parent_conn, stop, slots: _Slots | None = None) -> None:
    """Runs one stream in a worker process; events go to the consumer in batches.

    The pipe carries every batch (the documents themselves go through `slots` when there are
    any): a send blocks while the consumer is `prefetch` batches behind, and fails
    (BrokenPipeError) once the consumer has closed its end, which ends the worker."""
    parent_conn.close()  # the inherited read end: without it, a closed consumer means BrokenPipeError here
    _worker_signals()
    batch, nbytes = [], 0
    slot = 0
    try:
        if slots is not None and not slots.acquire(stop):
            return
        for ev in iter_stream(**args):
            n = len(ev[5]) if ev[0] == "doc" else 0
            if batch and nbytes + n > _BATCH_BYTES:  # keep a batch within one slot
                sent, batch, nbytes = batch, [], 0  # reset first: the error path sends only unsent events
                slot = _send_batch(conn, sent, slots, slot, stop)
                if slot < 0:
                    return
            batch.append(ev)
            nbytes += n
            if len(batch) >= _BATCH_EVENTS or nbytes >= _BATCH_BYTES or ev[0] != "doc":
                if stop.is_set():
                    return
                sent, batch, nbytes = batch, [], 0
                slot = _send_batch(conn, sent, slots, slot, stop)
                if slot < 0:
                    return
            if ev[0] == "end":
                return
    except (BrokenPipeError, ConnectionResetError):
        return  # the consumer went away
    except BaseException as e:  # every failure reaches the consumer, never a silent dead worker
        batch.append(("error", f"{type(e).__name__}: {e}", getattr(e, "shard", ""), getattr(e, "key", ""),
                      traceback.format_exc()))
        try:
            conn.send((None, batch))
        except OSError:
            pass
    finally:
        conn.close()


def _pipe_size(wanted: int) -> int:
    """`wanted` capped at the system's pipe-max-size: asking for more fails with EPERM and leaves the
    default 64 KB buffer, which cut the worker -> consumer transfer from about 1.1 GB/s to 0.35 GB/s."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            return min(wanted, int(f.read()))
    except (OSError, ValueError):
        return wanted


class StreamClient:
    """The consumer's handle on one stream: in-process generator or a worker process.

    The consumer holds only the read end of the worker's pipe: when the worker dies, even half
    way through a batch, the read ends with EOF and the death is reported, never a hang.
    """

    def __init__(self, args: dict, use_process: bool, prefetch: int = 8, mp_context: str = "fork",
                 shared_memory: bool = True):
        self.args = args
        self._buf: deque = deque()
        self._proc = None
        if use_process:
            ctx = mp.get_context(mp_context)
            self._conn, child_conn = ctx.Pipe(duplex=False)
            self._slots = _Slots(ctx, max(1, prefetch)) if shared_memory and mp_context == "fork" else None
            try:  # with slots the pipe still carries the events, and documents larger than a slot
                import fcntl

                fcntl.fcntl(self._conn.fileno(), _F_SETPIPE_SZ, _pipe_size(max(1, prefetch) * _BATCH_BYTES))
            except (ImportError, OSError):  # not Linux, or over pipe-max-size: the default buffer
                pass
            self._stop = ctx.Event()
            self._proc = ctx.Process(target=_worker_main, daemon=True, name=f"data-stream-{args['stream']}",
                                     args=(args, child_conn, self._conn, self._stop, self._slots))
            self._proc.start()
            child_conn.close()  # ours closed: the pipe reports EOF as soon as the worker is gone
        else:
            self._gen = iter_stream(**args)

    def next(self) -> tuple:
        if self._proc is None:
            return next(self._gen)  # DataError propagates as is
        while not self._buf:
            try:
                if not self._conn.poll(1.0):
                    if not self._proc.is_alive() and not self._conn.poll(0.5):
                        raise EOFError
                    continue
                self._receive()
            except (EOFError, OSError):
                self._proc.join(1.0)
                raise RuntimeError(f"data worker for stream {self.args['stream']} died "
                                   f"(exit code {self._proc.exitcode}) without reporting an error") from None
        ev = self._buf.popleft()
        if ev[0] == "error":
            raise DataError(f"data worker for stream {self.args['stream']} failed: {ev[1]}\n{ev[4]}",
                            shard=ev[2], key=ev[3])
        return ev

    def _receive(self) -> None:
        slot, batch = self._conn.recv()
        if slot is not None:
            mem, base = self._slots.mem, slot * _BATCH_BYTES
            for i, ev in enumerate(batch):
                if ev[0] == "doc" and isinstance(ev[5], tuple):
                    off, n = ev[5]
                    batch[i] = ev[:5] + (mem[base + off:base + off + n],)
            self._slots.free.release()  # copied out: the worker may fill this slot again
        self._buf.extend(batch)

    def request_stop(self) -> None:
        """Tell the worker to stop (close() waits for it); lets several workers stop in parallel."""
        if self._proc is not None:
            self._stop.set()
            self._conn.close()  # a worker blocked in send gets BrokenPipeError at once

    def close(self) -> None:
        if self._proc is None:
            self._gen.close()
            return
        self.request_stop()
        # a worker only reads shards: when it does not stop at once (busy parsing, or blocked on a
        # pipe another worker inherited), killing it loses nothing (it ignores SIGTERM, see
        # _worker_signals)
        self._proc.join(0.3)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(2.0)
        if self._slots is not None and not self._slots.mem.closed:
            self._slots.mem.close()  # now, not at garbage collection: workers forked later would inherit it
