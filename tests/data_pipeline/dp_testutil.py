"""Helpers for the data pipeline tests: synthetic shard sets with known documents."""
from __future__ import annotations

import hashlib
import os

import numpy as np

from data_pipeline.shard import TarShardWriter


def lognormal_docs(n: int, seed: int = 0, mean: float = 6.0, sigma: float = 1.2, cap: int = 20000) -> list[bytes]:
    """Random byte documents (all 256 values, so non-UTF-8) with heavy-tailed lengths >= 1."""
    rng = np.random.default_rng(seed)
    lens = np.minimum(rng.lognormal(mean, sigma, n).astype(int) + 1, cap)
    return [rng.integers(0, 256, int(k), dtype=np.uint8).tobytes() for k in lens]


def write_shard_set(out_dir: str, docs: list[bytes], docs_per_shard: int, extra_member=None) -> tuple[str, dict]:
    """Write docs into shards of `docs_per_shard` samples; returns (index path, {full key: bytes})."""
    w = TarShardWriter(out_dir, "shard", 1 << 40)
    expected = {}
    for i, d in enumerate(docs):
        if i and i % docs_per_shard == 0:
            w.roll()
        key = f"d{i:010d}"
        w.add(key, d)
        expected[f"shard-{i // docs_per_shard:06d}.tar:{key}"] = d
    w.finish("train", {})
    return os.path.join(out_dir, "index.json"), expected


def mb_digest(mb) -> str:
    h = hashlib.sha256()
    for t in (mb.input_ids, mb.labels, mb.cu_seqlens):
        h.update(t.numpy().tobytes())
    h.update("|".join(mb.keys).encode())
    h.update(f"{mb.n_bytes},{mb.n_targets},{mb.capacity}".encode())
    return h.hexdigest()


def step_digest(step) -> str:
    return hashlib.sha256("".join(mb_digest(m) for m in step.micro_batches).encode()).hexdigest()


def reassemble(steps_micro_batches) -> dict:
    """{doc key: bytes} rebuilt from micro-batches (pieces joined by offset); asserts no overlap."""
    parts: dict[str, dict[int, bytes]] = {}
    for mb in steps_micro_batches:
        ids = mb.input_ids[0].numpy().astype(np.uint8)
        cu = mb.cu_seqlens.tolist()
        for j, key in enumerate(mb.keys):
            a, b = cu[j], cu[j + 1]
            base, _, off = key.partition("@")
            data = ids[a + (0 if off else 1):b].tobytes()  # the document start has a BOS first
            offset = int(off) if off else 0
            slot = parts.setdefault(base, {})
            assert offset not in slot, f"piece {key} delivered twice"
            slot[offset] = data
    out = {}
    for base, slot in parts.items():
        buf, pos = b"", 0
        for off in sorted(slot):
            assert off == pos, f"{base}: gap or overlap at byte {pos} (next piece at {off})"
            buf += slot[off]
            pos += len(slot[off])
        out[base] = buf
    return out
