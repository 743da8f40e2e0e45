"""Point-to-point hand-offs between adjacent pipeline ranks, for tensors whose shapes change every
micro-batch (dynamic chunking decides how many positions the next level sees).

A message is a list of tensors. The sender posts a fixed-size int64 header (count, then per
tensor its dtype code and shape) and the tensors, all non-blocking (`isend`), and never waits
for them before its step ends. The receiver knows from the static schedule the order in which
each neighbour sends its messages (`schedule.send_order`) and receives them in exactly that
order, one header ahead: a header receive is always posted early, the payload receives as soon
as its header is in. In-order matching is what NCCL's point-to-point needs; gloo matches by
(source, tag) in order as well. A message that arrives before it is needed waits in the mailbox.
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


class Outbox:
    """Non-blocking sends; the tensors stay referenced until `wait_all` (the end of the step)."""

    def __init__(self, group, device):
        self.group, self.device = group, device
        self.pending: list = []
        self.bytes_sent = 0

    def send(self, dst: int, tensors: list[torch.Tensor]) -> None:
        payload = [t.detach().contiguous() for t in tensors]
        payload = [t.to(torch.uint8) if t.dtype == torch.bool else t for t in payload]  # gloo/NCCL: no bool
        header = encode_header([t for t in tensors], self.device)
        for t in [header, *payload]:
            self.pending.append((dist.isend(t, dst=dst, group=self.group, tag=TAG), t))
            self.bytes_sent += t.numel() * t.element_size()

    def wait_all(self) -> None:
        for work, _ in self.pending:
            work.wait()
        self.pending = []


class Mailbox:
    """Receives the messages of one neighbour in its send order (`expected`: their keys)."""

    def __init__(self, src: int, expected: list, group, device):
        self.src, self.expected, self.group, self.device = src, list(expected), group, device
        self.arrived: dict = {}  # key -> (header spec, [(work, tensor)])
        self.next = 0  # index in `expected` of the message whose header is posted
        self.header = None
        self.wait_s = 0.0
        self.bytes_received = 0
        self._post_header()

    def _post_header(self) -> None:
        if self.next < len(self.expected):
            buf = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
            self.header = (dist.irecv(buf, src=self.src, group=self.group, tag=TAG), buf)

    def _take_header(self) -> None:
        """Waits for the posted header, posts its payload receives and the next header."""
        work, buf = self.header
        work.wait()
        specs = decode_header(buf)
        recvs = []
        for dtype, shape in specs:
            wire = torch.uint8 if dtype == torch.bool else dtype
            t = torch.empty(shape, dtype=wire, device=self.device)
            recvs.append((dist.irecv(t, src=self.src, group=self.group, tag=TAG), t, dtype))
            self.bytes_received += t.numel() * t.element_size()
        self.arrived[self.expected[self.next]] = recvs
        self.next += 1
        self.header = None
        self._post_header()

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
