"""index.json: the list of shards a reader streams, with sample counts, byte counts and checksums.

Format (written by `python -m data_pipeline.shard`, or by `python -m data_pipeline.index` for
shards that came from elsewhere, e.g. webdataset.ShardWriter):

    {"format": "hnet-shards/1", "split": "train",
     "shards": [{"path": "shard-000000.tar", "samples": 812, "bytes": 2621440,
                 "file_bytes": 3051520, "sha256": "..."}, ...],
     "samples": ..., "bytes": ...}

`path` is relative to the index's folder, absolute, or a URL webdataset opens (`pipe:...`).
`bytes` counts document bytes (what the model reads), `file_bytes` the tar file.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from dataclasses import dataclass

from .tario import DataError, is_remote, iter_samples

INDEX_FORMAT = "hnet-shards/1"


@dataclass(frozen=True)
class ShardInfo:
    """One shard as the reader sees it: where to read it and how many samples it must hold."""

    url: str      # resolved path or URL
    name: str     # short name for keys and messages (the path as written in the index)
    samples: int
    bytes: int


def load_index(path: str) -> tuple[dict, list[ShardInfo]]:
    """Read and validate one index.json; shard paths resolved against the index's folder."""
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read shard index {path}: {e}", shard=path) from e
    if not isinstance(meta, dict) or not isinstance(meta.get("shards"), list):
        raise DataError(f"{path} is not a shard index (no 'shards' list)", shard=path)
    base = os.path.dirname(os.path.abspath(path))
    shards = []
    for i, s in enumerate(meta["shards"]):
        try:
            p, n, b = str(s["path"]), int(s["samples"]), int(s.get("bytes", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: shard entry {i} is malformed ({e})", shard=path) from e
        if n < 0:
            raise DataError(f"{path}: shard {p} has a negative sample count", shard=p)
        url = p if (is_remote(p) or os.path.isabs(p)) else os.path.join(base, p)
        shards.append(ShardInfo(url=url, name=p, samples=n, bytes=b))
    return meta, shards


def load_indexes(paths: list[str], allow_pipe_urls: bool = False) -> list[ShardInfo]:
    """All shards of several indexes, concatenated in the given order (shard ids index this list).
    A `pipe:` shard URL is a shell command every rank runs: refused unless `allow_pipe_urls`."""
    out: list[ShardInfo] = []
    for p in paths:
        shards = load_index(p)[1]
        piped = [s.name for s in shards if s.url.startswith("pipe:")]
        if piped and not allow_pipe_urls:
            raise DataError(f"{p} lists shard {piped[0]!r}: a pipe: URL runs a shell command on every rank. Set "
                            f"data.allow_pipe_urls=true if you trust this index", shard=p)
        out.extend(shards)
    if not out:
        raise DataError(f"no shards listed in {paths}")
    return out


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def index_existing_shards(tars: list[str], out_path: str, split: str = "train") -> dict:
    """Scan existing tar shards (any WebDataset writer) and write an index.json for them."""
    base = os.path.dirname(os.path.abspath(out_path))
    entries = []
    for t in tars:
        samples = nbytes = 0
        for _key, doc in iter_samples(t):
            samples += 1
            nbytes += len(doc or b"")
        rel = t if is_remote(t) else os.path.relpath(os.path.abspath(t), base)
        entry = {"path": rel, "samples": samples, "bytes": nbytes}
        if not is_remote(t):
            entry["file_bytes"] = os.path.getsize(t)
            entry["sha256"] = file_sha256(t)
        entries.append(entry)
    meta = {"format": INDEX_FORMAT, "split": split, "shards": entries,
            "samples": sum(e["samples"] for e in entries), "bytes": sum(e["bytes"] for e in entries)}
    write_json_atomic(out_path, meta)
    return meta


def verify_index(path: str) -> list[str]:
    """Check every local shard's size and sha256 against the index; returns the problems found."""
    meta, shards = load_index(path)
    problems = []
    for entry, s in zip(meta["shards"], shards):
        if is_remote(s.url):
            continue
        if not os.path.exists(s.url):
            problems.append(f"missing shard {s.url}")
        elif "sha256" in entry and file_sha256(s.url) != entry["sha256"]:
            problems.append(f"checksum mismatch {s.url}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.index",
        description="Write index.json for existing WebDataset tar shards, or verify an index.")
    ap.add_argument("tars", nargs="*", help="tar shards to index (paths or pipe: URLs)")
    ap.add_argument("-o", "--output", help="index.json to write")
    ap.add_argument("--split", default="train")
    ap.add_argument("--verify", metavar="INDEX", help="verify the checksums of an existing index")
    a = ap.parse_args(argv)
    if a.verify:
        problems = verify_index(a.verify)
        for p in problems:
            print(p)
        print("ok" if not problems else f"{len(problems)} problem(s)")
        return 1 if problems else 0
    if not a.tars or not a.output:
        ap.error("give tar shards and -o index.json (or --verify INDEX)")
    meta = index_existing_shards(a.tars, a.output, a.split)
    print(f"{a.output}: {len(meta['shards'])} shards, {meta['samples']} samples, {meta['bytes']} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
