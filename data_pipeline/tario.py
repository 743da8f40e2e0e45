"""Reading WebDataset tar shards: one sample per key, its document in a `.bin` or `.txt` member.

Local paths are opened directly; anything else (`pipe:cmd`, `http://...`, `s3://` through a
`pipe:` command) goes through webdataset's `gopen`, so remote object stores work on clusters.
"""
from __future__ import annotations

import io
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
            from webdataset import gopen  # imported only for remote shards

            return gopen(url, "rb")
        return open(url, "rb", buffering=1 << 20)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot open shard {url}: {e}", shard=url) from e


def split_member_name(name: str) -> tuple[str, str]:
    """WebDataset convention: key = path up to the first dot of the basename, ext = the rest."""
    d, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return (f"{d}/{stem}" if d else stem), ext


def iter_samples(url: str, views: bool = False) -> Iterator[tuple[str, bytes | memoryview | None]]:
    """Yield (key, document bytes) in tar order; bytes is None for a sample with no .bin/.txt member.

    The shard is read whole (the reader keeps a shard in memory anyway, for its in-shard
    permutation) and its ustar headers are parsed directly, which is several times faster than
    tarfile for shards of small documents; archives with pax/GNU extension headers go through
    tarfile. Raises DataError naming the shard (and the last good key) for a missing, truncated
    or corrupt tar.

    views=True yields memoryviews into the one shard buffer instead of copies: a caller that
    keeps every document of the shard (the reader, for its permutation) then holds the shard
    once, not twice.
    """
    stream = open_shard(url)
    try:
        buf = stream.read()
    except OSError as e:
        raise DataError(f"cannot read shard {url}: {e}", shard=url) from e
    finally:
        try:
            stream.close()
        except Exception:  # a pipe: stream raises on close when its command failed; caught below
            pass
    if not buf:
        raise DataError(f"shard {url} is empty or could not be read", shard=url)
    members, error = [], None
    try:
        if _parse_ustar(buf, url, members) is None:  # extension headers: let tarfile interpret them
            members = []
            _parse_with_tarfile(buf, url, members)
    except DataError as e:
        error = e  # the members before the damage are still good: yield them, then raise
    del buf  # the members are views of it: it lives exactly as long as they do
    key, doc, last_key = None, None, ""
    for name, data in members:
        if not views and isinstance(data, memoryview):
            data = bytes(data)
        k, ext = split_member_name(name)
        if k != key:
            if key is not None:
                yield key, doc
                last_key = key
            key, doc = k, None
        if ext in DOC_EXTENSIONS and (doc is None or ext == "bin"):
            doc = data
    if key is not None:
        yield key, doc
    if error is not None:
        raise error


_PLAIN_FILE_TYPES = (b"0", b"\0", b"7")


def _parse_ustar(buf: bytes, url: str, out: list) -> list | None:
    """Appends (member name, memoryview of its bytes in `buf`) of the regular files to `out`; None
    when the archive needs tarfile."""
    pos, n = 0, len(buf)
    mv = memoryview(buf)
    while True:
        if pos + 512 > n:
            if pos == n and out:  # no end-of-archive blocks: tolerated, like tarfile does
                return out
            raise DataError(f"truncated shard {url}: ends inside a header after "
                            f"{_last(out)}", shard=url, key=_last_key(out))
        hdr = buf[pos:pos + 512]
        if hdr == _ZERO_BLOCK:
            return out
        chk = _octal(hdr[148:156])
        if chk is None or chk != sum(hdr) - sum(hdr[148:156]) + 256:
            raise DataError(f"corrupt shard {url}: bad header checksum after {_last(out)}",
                            shard=url, key=_last_key(out))
        typeflag = hdr[156:157]
        if typeflag not in _PLAIN_FILE_TYPES and typeflag != b"5":
            return None
        size = _octal(hdr[124:136])
        if size is None:
            return None  # base-256 sizes (huge members): tarfile knows them
        name = hdr[0:100].split(b"\0", 1)[0]
        if hdr[257:262] == b"ustar":
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        start = pos + 512
        end = start + size
        if end > n:
            raise DataError(f"truncated shard {url}: member {name.decode('utf-8', 'replace')} is cut "
                            f"short", shard=url, key=_last_key(out))
        if typeflag != b"5":
            out.append((name.decode("utf-8", "surrogateescape"), mv[start:end]))
        pos = start + (size + 511) // 512 * 512


_ZERO_BLOCK = bytes(512)


def _octal(field: bytes) -> int | None:
    text = field.split(b"\0", 1)[0].strip()
    if not text:
        return 0
    try:
        return int(text, 8)
    except ValueError:
        return None


def _last(out) -> str:
    return f"member {out[-1][0]}" if out else "<start>"


def _last_key(out) -> str:
    return split_member_name(out[-1][0])[0] if out else ""


def _parse_with_tarfile(buf: bytes, url: str, out: list) -> list:
    try:
        with tarfile.open(fileobj=io.BytesIO(buf), mode="r:") as tar:
            for member in tar:
                if member.isfile():
                    data = tar.extractfile(member).read()
                    if len(data) != member.size:
                        raise tarfile.ReadError(f"member {member.name} truncated")
                    out.append((member.name, data))
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        raise DataError(f"corrupt or truncated shard {url} after {_last(out)}: {e}",
                        shard=url, key=_last_key(out)) from e
    return out
