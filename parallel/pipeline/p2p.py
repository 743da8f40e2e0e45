"""Point-to-point hand-offs between adjacent pipeline ranks, for tensors whose shapes change every
micro-batch (dynamic chunking decides how many positions the next level sees).

A message is a list of tensors. The sender posts a fixed-size int64 header (count, then per
tensor its dtype code and shape) and the tensors, all non-blocking (`isend`), and never waits
for them before its step ends. The receiver knows from the static schedule the order in which
each neighbour sends its messages (`schedule.send_order`) and takes them in exactly that order:
when it needs a message, it receives the next header and waits for it, then posts that message's
payload receives. A message taken on the way to a later one waits in the mailbox.

What NCCL asks of this, and gloo (the CPU tests' backend) does not:
- Order. ProcessGroupNCCL ignores tags and runs a rank's un-batched sends and receives on one
  group in issue order on one stream: per pair of ranks when the group was made lazily, per
  group when the world is bound to a device (DeepSpeed passes `device_id`). A receive waiting
  there for its data holds every later operation on the stream. So each direction between two
  neighbouring stages has a group of its own (`PipelineGrid.p2p_group`), in which a rank only
  sends to one peer or only receives from one, in one agreed order.
- No receive left waiting. A receive kernel posted before the data is due spins on the GPU;
  anything that synchronises the whole device meanwhile (cudaFree when the caching allocator
  gives memory back under pressure) waits for it, while its send may wait for this rank. A
  header is therefore received only when the host blocks on it anyway; the payload receives
  after it match sends the peer issued with that header. Sends are posted early and wait on the
  GPU for their receives as well (a large payload does not fit NCCL's buffers): that they end
  rests on every receiver taking its messages in send order within the step (`Mailbox.done` is
  checked at the step's end), and on nothing synchronising the whole device while a rank waits
  for its neighbour's data, which only a run on GPUs can confirm.
- Creation. A communicator made at its first use blocks both hosts until each has used it, so
  `connect` makes them all at the start, neighbour pair by neighbour pair down the pipeline,
  before a step can wait on one. (Bound to a device, `new_group` already made them.)
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32, torch.int64, torch.uint8,
          torch.bool]
MAX_TENSORS, MAX_DIMS = 12, 3
HEADER_LEN = 1 + MAX_TENSORS * (2 + MAX_DIMS)
TAG = 7  # one tag for every message: order alone pairs sends with receives


def encode_header(tensors: list[torch.Tensor], device) -> torch.Tensor:
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a pipeline message holds at most {MAX_TENSORS} tensors, got {len(tensors)}")
    h = [len(tensors)]
    for t in tensors:
        if t.dim() > MAX_DIMS:
            raise ValueError(f"a pipeline message tensor has at most {MAX_DIMS} dims, got shape {tuple(t.shape)}")
        h += [DTYPES.index(t.dtype), t.dim(), *t.shape, *([0] * (MAX_DIMS - t.dim()))]
    h += [0] * (HEADER_LEN - len(h))
    return torch.tensor(h, dtype=torch.int64, device=device)


def decode_header(header: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    h = header.tolist()
    out = []
    for i in range(h[0]):
        code, ndim, *dims = h[1 + i * (2 + MAX_DIMS): 1 + (i + 1) * (2 + MAX_DIMS)]
        out.append((DTYPES[code], tuple(dims[:ndim])))
    return out


def connect(me: int, neighbours: list[int], group_of, device) -> None:
    """Creates this rank's point-to-point communicators before any step: for each neighbour, the
    one of the earlier stage first (stages hold ascending ranks), one int64 (the sender's rank)
    each way on the pair's two groups, the earlier stage sending first, an order every rank of the
    pipeline agrees on, so the blocking creations form a chain down the pipeline instead of
    waiting on each other. The received ranks are checked: a grid that pairs the wrong ranks
    fails here, naming them."""
    for nb in sorted(neighbours):
        earlier, later = min(me, nb), max(me, nb)
        for src, dst in ((earlier, later), (later, earlier)):
            group = group_of(src, dst)
            buf = torch.tensor([me if src == me else -1], dtype=torch.int64, device=device)
            if src == me:
                dist.isend(buf, dst=dst, group=group, tag=TAG).wait()
            else:
                dist.irecv(buf, src=src, group=group, tag=TAG).wait()
                got = int(buf.item())  # once at start: the channel is checked before training
                if got != src:
                    raise RuntimeError(f"pipeline rank {me}: the channel from rank {src} delivered rank {got}'s "
                                       f"message: the pipeline grid pairs the wrong ranks")


class Outbox:
    """Non-blocking sends; the tensors stay referenced until `wait_all` (the end of the step)."""

    def __init__(self, group_of, device):
        self.group_of, self.device = group_of, device  # group_of(dst): the group of messages to dst
        self.pending: list = []
        self.bytes_sent = 0

    def send(self, dst: int, tensors: list[torch.Tensor]) -> None:
        payload = [t.detach().contiguous() for t in tensors]
        payload = [t.to(torch.uint8) if t.dtype == torch.bool else t for t in payload]  # gloo/NCCL: no bool
        header = encode_header([t for t in tensors], self.device)
        for t in [header, *payload]:
            self.pending.append((dist.isend(t, dst=dst, group=self.group_of(dst), tag=TAG), t))
            self.bytes_sent += t.numel() * t.element_size()

    def wait_all(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


class Mailbox:
    """Receives the messages of one neighbour in its send order (`expected`: their keys), on the
    group of that neighbour's messages to this rank. A header receive is posted only when this
    rank needs a message and waits for it at once (see the module docstring)."""

    def __init__(self, src: int, expected: list, group, device):
        self.src, self.expected, self.group, self.device = src, list(expected), group, device
        self.arrived: dict = {}  # key -> [(work, tensor, dtype)]
        self.next = 0  # index in `expected` of the next message to take
        self.wait_s = 0.0
        self.bytes_received = 0

    def _take_header(self) -> None:
        """Receives the next message's header and posts its payload receives."""
        buf = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        dist.irecv(buf, src=self.src, group=self.group, tag=TAG).wait()
        specs = decode_header(buf)
        recvs = []
        for dtype, shape in specs:
            wire = torch.uint8 if dtype == torch.bool else dtype
            t = torch.empty(shape, dtype=wire, device=self.device)
            recvs.append((dist.irecv(t, src=self.src, group=self.group, tag=TAG), t, dtype))
            self.bytes_received += t.numel() * t.element_size()
        self.arrived[self.expected[self.next]] = recvs
        self.next += 1

    def get(self, key) -> list[torch.Tensor]:
        """The tensors of message `key` (blocks until they are in; the wait is timed)."""
        t0 = time.perf_counter()
        while key not in self.arrived:
            if self.next >= len(self.expected):
                raise RuntimeError(f"pipeline message {key} from rank {self.src} was never expected")
            self._take_header()
        out = []
        for work, t, dtype in self.arrived.pop(key):
            work.wait()
            out.append(t.to(torch.bool) if dtype == torch.bool else t)
        self.wait_s += time.perf_counter() - t0
        return out

    def done(self) -> bool:
        return self.next >= len(self.expected) and not self.arrived
