"""Packing: documents -> pieces of at most one row -> one MicroBatch row with cu_seqlens.

A document of n bytes occupies n + 1 positions in a row: BOS (254) and its bytes. Labels are the
next byte of the same document; the last byte of a document has no target (IGNORE_INDEX). A
document longer than a row is cut into pieces; a continuation piece starts without BOS (it is not
a fresh document start) and the last position of every piece but the final one keeps its target:
the first byte of the next piece, known when the document is cut.
"""
from __future__ import annotations

import numpy as np
import torch

from .batch import IGNORE_INDEX, MicroBatch

BOS = 254
PAD = 0
_BOS_BYTE = bytes([BOS])


class Piece:
    """A run of one document's bytes that goes into one row as one cu_seqlens segment.

    key:       "shard:key" for the piece holding the document start, "shard:key@offset" otherwise.
    data:      the document bytes of this piece (BOS not included).
    bos:       True when the piece starts the document (a BOS position is prepended).
    next_byte: target of the piece's last position: the document's following byte, or -1 at its end.
    """

    __slots__ = ("key", "data", "bos", "next_byte", "length")

    def __init__(self, key: str, data: bytes, bos: bool = True, next_byte: int = -1):
        self.key, self.data, self.bos, self.next_byte = key, data, bool(bos), int(next_byte)
        self.length = len(data) + self.bos  # positions this piece takes in a row (read often: stored)

    @property
    def n_targets(self) -> int:
        return self.length - 1 + (self.next_byte >= 0)

    def __getstate__(self):
        return (self.key, self.data, self.bos, self.next_byte)

    def __setstate__(self, s):
        self.__init__(*s)

    def __repr__(self) -> str:
        return f"Piece({self.key!r}, {len(self.data)} bytes, bos={self.bos}, next={self.next_byte})"


def _base_key(key: str) -> str:
    return key.split("@", 1)[0]


def split_piece(piece: Piece, capacity: int, restart_split_docs: bool = False) -> list[Piece]:
    """Cut a piece into pieces of at most `capacity` positions.

    restart_split_docs=True treats every part as a fresh document (own BOS, no target across the cut).
    """
    if piece.length <= capacity:
        return [piece]
    if capacity < 2:
        raise ValueError("micro_batch_bytes must be at least 2")
    base, data = _base_key(piece.key), piece.data
    start_offset = int(piece.key.split("@", 1)[1]) if "@" in piece.key else 0
    out, a, bos = [], 0, piece.bos
    while a < len(data):
        b = min(len(data), a + capacity - (1 if (bos or restart_split_docs) else 0))
        last = b >= len(data)
        nxt = piece.next_byte if last else (-1 if restart_split_docs else data[b])
        off = start_offset + a
        key = base if (a == 0 and piece.bos) else f"{base}@{off}"
        out.append(Piece(key, data[a:b], bos or restart_split_docs, nxt))
        a, bos = b, False
    return out


def cut_piece(piece: Piece, head_len: int, restart_split_docs: bool = False) -> tuple[Piece, Piece]:
    """Split a piece after `head_len` positions (1 <= head data) into (head, tail), document order kept."""
    k = head_len - piece.bos - (1 if restart_split_docs and not piece.bos else 0)
    if not 0 < k < len(piece.data):
        raise ValueError(f"cannot cut {piece!r} at {head_len}")
    base = _base_key(piece.key)
    start_offset = int(piece.key.split("@", 1)[1]) if "@" in piece.key else 0
    if restart_split_docs:
        head = Piece(piece.key, piece.data[:k], True, -1)
        return head, Piece(f"{base}@{start_offset + k}", piece.data[k:], True, piece.next_byte)
    head = Piece(piece.key, piece.data[:k], piece.bos, piece.data[k])
    return head, Piece(f"{base}@{start_offset + k}", piece.data[k:], False, piece.next_byte)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def pack_row(pieces: list[Piece], capacity: int, round_to: int = 1) -> MicroBatch:
    """Lay pieces end to end in one row (1, T); T = real positions rounded up to `round_to`.

    Padding (from rounding, or a whole dummy row when `pieces` is empty: ZeRO-3 needs the same
    number of micro-batches on every rank) is its own cu_seqlens segment with no targets.
    """
    real = sum(p.length for p in pieces)
    if real > capacity:
        raise ValueError(f"pieces take {real} positions, row capacity is {capacity}")
    T = max(round_up(real, round_to), round_to, 1)
    # Byte ids stay uint8 and labels int16 (bytes and IGNORE_INDEX fit): 3 bytes per position
    # instead of 16 for int64, which made this copy the main process's largest cost and is 5x
    # less to pin and send to the device. The model widens both on the device.
    # Labels are the ids shifted by one; each piece's last position then gets its next byte
    # (or IGNORE_INDEX).
    row = b"".join(_BOS_BYTE + p.data if p.bos else p.data for p in pieces)
    ids = np.empty(T, dtype=np.uint8)
    ids[:real] = np.frombuffer(row, dtype=np.uint8)
    ids[real:] = PAD
    labels = np.empty(T, dtype=np.int16)
    if real:
        labels[:real - 1] = ids[1:real]
    labels[max(real - 1, 0):] = IGNORE_INDEX
    ends = np.cumsum([p.length for p in pieces], dtype=np.int64)
    if len(pieces):
        labels[ends - 1] = [p.next_byte if p.next_byte >= 0 else IGNORE_INDEX for p in pieces]
    cu = np.zeros(len(pieces) + 1 + (real < T), dtype=np.int32)
    cu[1:len(pieces) + 1] = ends
    if real < T:
        cu[-1] = T
    n_targets = real - len(pieces) + sum(p.next_byte >= 0 for p in pieces)
    return MicroBatch(
        input_ids=torch.from_numpy(ids).view(1, T),
        labels=torch.from_numpy(labels).view(1, T),
        cu_seqlens=torch.from_numpy(cu),
        n_bytes=real, n_targets=n_targets, capacity=capacity,
        keys=[p.key for p in pieces])
