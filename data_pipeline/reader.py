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
events (documents in shared-memory slots, see _SlotWriter; otherwise pickled into the pipe,
whose buffer then bounds the prefetch); the consumer tracks positions from the
events it has *consumed*, so prefetched events never count, and a resume restarts the workers at
the consumed positions.
"""
from __future__ import annotations

import logging
import mmap
import os
import pickle
import signal
import subprocess
import sys
import traceback
from collections import deque
from multiprocessing.connection import Connection
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
#
# A worker is a fresh interpreter (subprocess: fork + exec at once), not a multiprocessing
# fork of the consumer. The trainer has threads (gloo, DeepSpeed, torch); a plain fork copies
# whatever lock one of them holds, and the child can hang before running a line of Python: the
# 2-rank loader test hung that way in about 1 of 10 runs. exec leaves nothing of the parent.
# Everything between the two is a file descriptor, so a consumer that goes away, however it
# dies, ends its workers (EOF / EPIPE), and no stop event or process table is needed.

_BATCH_EVENTS = 64
_BATCH_BYTES = 1 << 20  # also the size of one shared-memory slot
_F_SETPIPE_SZ = 1031  # Linux fcntl: a larger pipe buffer is the prefetch depth of the pipe transport
_WORKER_TAG = "hnet-data-worker"  # in every worker's command line (ps, tests)


class _SlotWriter:
    """The worker's side of the shared-memory slots (see StreamClient).

    `n` slots of _BATCH_BYTES in a memfd, used in turn. The free slots are tokens in a pipe: the
    worker reads one before filling a slot, the consumer writes one back once it has copied a
    slot's documents out. Pickling the documents through the data pipe instead costs the
    consumer a read, a buffer copy and an unpickle per byte: with 2 workers on 2 cores that made
    the consumer, the one process every byte goes through, the bottleneck."""

    def __init__(self, mem_fd: int, free_fd: int, n: int):
        self.n, self.free_fd, self.slot = n, free_fd, 0
        self.mem = mmap.mmap(mem_fd, n * _BATCH_BYTES)
        os.close(mem_fd)

    def acquire(self) -> bool:
        """Wait for a free slot; False once the consumer has closed the token pipe (stopped or died)."""
        return os.read(self.free_fd, 1) != b""

    def pack(self, batch: list) -> list:
        """Documents of `batch` into the current slot; the events carry (offset, length) instead."""
        base, off, out = self.slot * _BATCH_BYTES, 0, []
        for ev in batch:
            if ev[0] == "doc" and off + len(ev[5]) <= _BATCH_BYTES:
                n = len(ev[5])
                self.mem[base + off:base + off + n] = ev[5]
                ev = ev[:5] + ((off, n),)
                off += n
            out.append(ev)  # a document larger than a slot travels in the pickle
        return out


def _worker_signals() -> None:
    """A worker ignores SIGTERM, SIGUSR1 and SIGINT: they are the consumer's business. SLURM sends
    SIGTERM (preemption with GraceTime, scancel) and SIGUSR1 (--signal with --full) to every
    process of the step, and Ctrl-C reaches the whole process group; the trainer answers them
    with a checkpoint, for which it still needs its data, so a worker must not die of them. A
    worker ends when its consumer stops it or goes away: EOF on the token pipe, EPIPE on the
    data pipe."""
    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def worker_process_main() -> None:
    """Entry point of a worker process: its setup arrives pickled on stdin."""
    _worker_signals()
    args, data_fd, slots_fds = pickle.load(sys.stdin.buffer)
    conn = Connection(data_fd, readable=False)
    slots = _SlotWriter(*slots_fds) if slots_fds else None
    _run_worker(args, conn, slots)


def _run_worker(args: dict, conn, slots: _SlotWriter | None) -> None:
    """Runs one stream; events go to the consumer in batches over `conn` (their documents through
    `slots` when there are any). A send blocks while the consumer is `prefetch` batches behind."""
    batch, nbytes = [], 0

    def send(events: list) -> bool:
        if slots is None:
            conn.send((None, events))
            return True
        conn.send((slots.slot, slots.pack(events)))
        slots.slot = (slots.slot + 1) % slots.n
        # the next batch's slot; after the stream's last event there is none to wait for
        return events[-1][0] == "end" or slots.acquire()

    try:
        if slots is not None and not slots.acquire():
            return
        for ev in iter_stream(**args):
            n = len(ev[5]) if ev[0] == "doc" else 0
            if batch and nbytes + n > _BATCH_BYTES:  # keep a batch within one slot
                sent, batch, nbytes = batch, [], 0  # reset first: the error path sends only unsent events
                if not send(sent):
                    return
            batch.append(ev)
            nbytes += n
            if len(batch) >= _BATCH_EVENTS or nbytes >= _BATCH_BYTES or ev[0] != "doc":
                sent, batch, nbytes = batch, [], 0
                if not send(sent):
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

    The consumer holds only the read end of the worker's data pipe: when the worker dies, even
    half way through a batch, the read ends with EOF and the death is reported, never a hang.
    shared_memory: documents through memfd slots (Linux); else pickled through the data pipe.
    """

    def __init__(self, args: dict, use_process: bool, prefetch: int = 8, shared_memory: bool = True):
        self.args = args
        self._buf: deque = deque()
        self._proc = None
        self._restarted = False
        self._last = None  # the last event received from the worker: where a restart resumes
        if not use_process:
            self._gen = iter_stream(**args)
            return
        self._prefetch, self._shared_memory = max(1, prefetch), shared_memory
        self._spawn(args)

    def _spawn(self, args: dict) -> None:
        n = self._prefetch
        data_r, data_w = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(data_r, _F_SETPIPE_SZ, _pipe_size(n * _BATCH_BYTES))
        except (ImportError, OSError):  # not Linux, or over pipe-max-size: the default buffer
            pass
        child_fds, slots_fds = [data_w], None
        self._mem = self._free_w = None
        if self._shared_memory and hasattr(os, "memfd_create"):
            mem_fd = os.memfd_create("hnet-data-slots", os.MFD_CLOEXEC)
            os.ftruncate(mem_fd, n * _BATCH_BYTES)
            self._mem = mmap.mmap(mem_fd, n * _BATCH_BYTES)
            free_r, self._free_w = os.pipe()
            os.write(self._free_w, b"\0" * n)  # n free slots
            child_fds += [mem_fd, free_r]
            slots_fds = (mem_fd, free_r, n)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [package_root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", "from data_pipeline.reader import worker_process_main; worker_process_main()",
                 _WORKER_TAG, f"stream={args['stream']}", f"consumer={os.getpid()}"],
                stdin=subprocess.PIPE, pass_fds=child_fds, env=env)
            self._proc.stdin.write(pickle.dumps((args, data_w, slots_fds)))
            self._proc.stdin.close()
        finally:
            for fd in child_fds:  # the worker's ends: ours closed, so EOF / EPIPE mean "the other side is gone"
                os.close(fd)
        self._conn = Connection(data_r, writable=False)

    def next(self) -> tuple:
        if self._proc is None:
            return next(self._gen)  # DataError propagates as is
        while not self._buf:
            try:
                if not self._conn.poll(1.0):
                    if self._proc.poll() is not None and not self._conn.poll(0.5):
                        raise EOFError
                    continue
                self._receive()
            except (EOFError, OSError):
                try:
                    self._proc.wait(1.0)
                except Exception:
                    pass
                code = self._proc.returncode
                if self._restarted:
                    raise RuntimeError(f"data worker for stream {self.args['stream']} died (exit code {code}) "
                                       f"without reporting an error, and had been restarted once already") from None
                self._restart(code)
        ev = self._buf.popleft()
        if ev[0] == "error":
            raise DataError(f"data worker for stream {self.args['stream']} failed: {ev[1]}\n{ev[4]}",
                            shard=ev[2], key=ev[3])
        return ev

    def _restart(self, code) -> None:
        """A worker that died without a word (killed, out of memory) is started once more, right
        after the last event it delivered: what was received stays in the buffer, so the stream
        goes on as if nothing happened. A second death ends the stream with an error."""
        args = resume_args(self.args, self._last)
        log.warning("data worker for stream %s died (exit code %s) without reporting an error; restarted once, "
                    "from epoch %d plan entry %d offset %d", self.args["stream"], code, args["epoch"], *args["position"])
        self._close_worker()
        self._restarted = True
        self._spawn(args)

    def _receive(self) -> None:
        slot, batch = self._conn.recv()
        if slot is not None:
            mem, base = self._mem, slot * _BATCH_BYTES
            for i, ev in enumerate(batch):
                if ev[0] == "doc" and isinstance(ev[5], tuple):
                    off, n = ev[5]
                    batch[i] = ev[:5] + (mem[base + off:base + off + n],)
            try:
                os.write(self._free_w, b"\0")  # copied out: the worker may fill this slot again
            except BrokenPipeError:
                pass  # the worker has ended after its last batch: nobody needs the slot
        self._buf.extend(batch)
        if batch:
            self._last = batch[-1]

    def request_stop(self) -> None:
        """Tell the worker to stop (close() waits for it); lets several workers stop in parallel.
        Closing our pipe ends is the message: the worker's next read or send fails."""
        if self._proc is not None:
            if not self._conn.closed:
                self._conn.close()
            if self._free_w is not None:
                os.close(self._free_w)
                self._free_w = None

    def close(self) -> None:
        if self._proc is None:
            self._gen.close()
            return
        self._close_worker()

    def _close_worker(self) -> None:
        self.request_stop()
        # a worker only reads shards: when it does not stop at once (busy parsing a shard),
        # killing it loses nothing (it ignores SIGTERM, see _worker_signals)
        try:
            self._proc.wait(0.3)
        except Exception:
            self._proc.kill()
            try:
                self._proc.wait(2.0)
            except Exception:
                pass
        if self._mem is not None and not self._mem.closed:
            self._mem.close()


def resume_args(args: dict, last: tuple | None) -> dict:
    """The stream arguments that continue right after event `last` of a stream started with
    `args` (its first event when `last` is None)."""
    if last is None:
        return dict(args)
    kind, epoch = last[0], last[1]
    plan = args["plan"] if epoch == args["epoch"] else fresh_plans(len(args["shards"]), args["seed"], epoch,
                                                                   args["n_streams"])[args["stream"]]
    if kind in ("doc", "skip"):
        return dict(args, epoch=epoch, plan=plan, position=[last[2], last[3] + 1])
    if kind == "shard_skip":
        k = last[2] + 1
        return dict(args, epoch=epoch, plan=plan, position=[k, plan[k][1] if k < len(plan) else 0])
    if kind == "epoch_end":
        nxt = fresh_plans(len(args["shards"]), args["seed"], epoch + 1, args["n_streams"])[args["stream"]]
        return dict(args, epoch=epoch + 1, plan=nxt, position=[0, 0])
    raise ValueError(f"a stream does not continue after a {kind!r} event")
