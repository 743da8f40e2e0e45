"""Reading WebDataset tar shards: one sample per key, its document in a `.bin` or `.txt` member.

Local paths are opened directly; anything else (`pipe:cmd`, `http://...`, `s3://` through a
`pipe:` command) goes through webdataset's `gopen`, so remote object stores work on clusters.
"""
from __future__ import annotations

import os
import tarfile
from typing import Iterator

DOC_EXTENSIONS = ("bin", "txt")  # preferred first: .bin holds raw bytes, .txt from ShardWriter


class DataError(RuntimeError):
    """A data problem (missing shard, corrupt tar, unreadable or empty document); names shard and key."""

    def __init__(self, message: str, shard: str = "", key: str = ""):
        super().__init__(message)
        self.shard = shard
        self.key = key


def is_remote(url: str) -> bool:
    return url.startswith("pipe:") or "://" in url


def open_shard(url: str):
    """A binary stream over the shard's bytes (raises DataError when it cannot be opened)."""
    try:
        if is_remote(url):
            import webdataset.gopen as wds_gopen  # module: local import keeps workers light

            return wds_gopen.gopen(url, "rb")
        return open(url, "rb", buffering=1 << 20)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open shard {url}: {e}", shard=url) from e


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def iter_samples(url: str) -> Iterator[tuple[str, bytes | None]]:
    """Yield (key, document bytes) in tar order; bytes is None for a sample with no .bin/.txt member.

    Raises DataError naming the shard (and the last good key) for a missing, truncated or corrupt tar.
    """
    stream = open_shard(url)
    key, doc, last_key = None, None, ""
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                k, ext = split_member_name(member.name)
                if k != key:
                    if key is not None:
                        yield key, doc
                        last_key = key
                    key, doc = k, None
                if ext in DOC_EXTENSIONS and (doc is None or ext == "bin"):
                    f = tar.extractfile(member)
                    data = f.read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} truncated")
                    doc = data
        if key is not None:
            yield key, doc
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"corrupt or truncated shard {url} after key {last_key or '<start>'}: {e}",
                        shard=url, key=last_key) from e
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: stream raises on close when the command failed; already reported
            pass
