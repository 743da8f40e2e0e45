"""Shard writer: raw text, jsonl(.gz) and parquet files -> WebDataset byte shards + index.json.

    python -m data_pipeline.shard OUT_DIR INPUTS... [options]
    python -m data_pipeline.shard --demo OUT_DIR          # the embedded demo corpus, no download

Writes OUT_DIR/train/shard-000000.tar ... and OUT_DIR/train/index.json (plus OUT_DIR/val/...
when --val-fraction > 0). Every document is one sample: member `<key>.bin` holding its raw bytes
(never decoded: the model reads bytes). Keys are `d` + the document's 10-digit position in the
sorted input stream, so re-running over the same inputs writes byte-identical shards (fixed tar
mtime/uid/mode). A shard is written under a temporary name, fsync'ed and renamed, and index.json
is written last: a crash never leaves a half shard under a final name.
"""
from __future__ import annotations

import argparse
import codecs
import fnmatch
import glob
import gzip
import hashlib
import io
import json
import os
import re
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from .index import INDEX_FORMAT, write_json_atomic

_TAR_BLOCK = 512


def parse_size(text: str | int) -> int:
    """'256MB' -> 256_000_000, '1GiB' -> 2**30, '4096' -> 4096."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kKmMgGtT]?)(i?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64KB, 256MB, 1GiB)")
    base = 1024 if m.group(3) else 1000
    power = " KMGT".index(m.group(2).upper() or " ")
    return int(float(m.group(1)) * base ** power)


@dataclass
class WriterOptions:
    shard_size: int = 256_000_000          # target tar size in bytes (a single larger document still gets written)
    val_fraction: float = 0.0              # share of documents (chosen by content hash) written to the val split
    min_doc_bytes: int = 1                 # shorter documents are skipped (empty ones always are)
    max_doc_bytes: int | None = None       # longer ones follow long_docs
    long_docs: str = "keep"                # keep (the packer splits them) | truncate | drop
    text_field: str = "text"               # jsonl field (dotted path for nested objects)
    column: str = "text"                   # parquet column
    split_on: bytes | None = None          # separator inside plain text files (None: one file = one document)
    prefix: str = "shard"
    include: str | None = None             # glob on file names inside directories, e.g. '*.txt'
    progress: bool = True
    overwrite: bool = False                # replace the shards of an earlier run in the same output folder


@dataclass
class WriteSummary:
    documents: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    bytes: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    shards: dict = field(default_factory=lambda: {"train": 0, "val": 0})
    skipped_files: list = field(default_factory=list)     # (path, why)
    skipped_docs: dict = field(default_factory=dict)      # why -> count
    long_docs: int = 0
    seconds: float = 0.0
    max_listed: int = 50  # skipped files listed in text(); all of them stay in skipped_files

    def skip_doc(self, why: str) -> None:
        self.skipped_docs[why] = self.skipped_docs.get(why, 0) + 1

    def text(self) -> str:
        lines = []
        for split in ("train", "val"):
            if self.documents[split] or split == "train":
                lines.append(f"{split}: {self.documents[split]} documents, {self.bytes[split]} bytes, "
                             f"{self.shards[split]} shards")
        total = sum(self.bytes.values())
        lines.append(f"time {self.seconds:.1f} s ({total / max(self.seconds, 1e-9) / 1e6:.1f} MB/s)")
        if self.long_docs:
            lines.append(f"long documents (> max-doc-bytes): {self.long_docs}")
        for why, n in sorted(self.skipped_docs.items()):
            lines.append(f"skipped documents ({why}): {n}")
        for path, why in self.skipped_files[:self.max_listed]:
            lines.append(f"skipped file {path}: {why}")
        if len(self.skipped_files) > self.max_listed:
            lines.append(f"... and {len(self.skipped_files) - self.max_listed} more skipped files")
        return "\n".join(lines)


class _HashingFile:
    """Write-through file wrapper that hashes what tarfile writes (no second pass over the shard)."""

    def __init__(self, f):
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def write(self, b) -> int:
        self.sha.update(b)
        self.n += len(b)
        return self.f.write(b)

    def tell(self) -> int:
        return self.n


class TarShardWriter:
    """Rolls documents into `DIR/PREFIX-NNNNNN.tar` files of about `shard_size` bytes, atomically."""

    def __init__(self, out_dir: str, prefix: str, shard_size: int):
        os.makedirs(out_dir, exist_ok=True)
        self.out_dir, self.prefix, self.shard_size = out_dir, prefix, shard_size
        self.entries: list[dict] = []
        self._tar = None

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.entries):06d}.tar"
        self._final = os.path.join(self.out_dir, name)
        self._tmp = os.path.join(self.out_dir, f".{name}.tmp.{os.getpid()}")
        self._file = open(self._tmp, "wb")
        self._hf = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hf, mode="w|", format=tarfile.USTAR_FORMAT)
        self._entry = {"path": name, "samples": 0, "bytes": 0}
        self._size = 2 * _TAR_BLOCK  # end-of-archive blocks

    def add(self, key: str, data: bytes) -> None:
        member = _TAR_BLOCK + -(-len(data) // _TAR_BLOCK) * _TAR_BLOCK
        if self._tar is not None and self._entry["samples"] and self._size + member > self.shard_size:
            self._close()
        if self._tar is None:
            self._open()
        info = tarfile.TarInfo(f"{key}.bin")
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))
        self._size += member
        self._entry["samples"] += 1
        self._entry["bytes"] += len(data)

    def roll(self) -> None:
        """End the current shard now (the next document starts a new one)."""
        if self._tar is not None:
            self._close()

    def _close(self) -> None:
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._tmp, self._final)
        self._entry["file_bytes"] = self._hf.n
        self._entry["sha256"] = self._hf.sha.hexdigest()
        self.entries.append(self._entry)
        self._tar = None

    def finish(self, split: str, extra: dict) -> dict:
        """Close the last shard and write index.json (last, atomically); returns the index."""
        if self._tar is not None:
            self._close()
        _fsync_dir(self.out_dir)
        meta = {"format": INDEX_FORMAT, "split": split, "shards": self.entries,
                "samples": sum(e["samples"] for e in self.entries),
                "bytes": sum(e["bytes"] for e in self.entries), **extra}
        write_json_atomic(os.path.join(self.out_dir, "index.json"), meta)
        _fsync_dir(self.out_dir)
        return meta


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------- inputs -> documents

def expand_inputs(inputs: list[str], include: str | None = None,
                  exclude_dirs: list[str] = ()) -> tuple[list[str], list[tuple[str, str]]]:
    """Files named by paths, directories (recursive, hidden entries skipped) and globs; sorted, unique.

    Files under `exclude_dirs` (the writer's own OUT_DIR/train and OUT_DIR/val, when they lie
    inside an input directory) are left out: sharding them would put an earlier run's tars
    into the corpus as documents."""
    files, missing = set(), []
    excluded = tuple(os.path.realpath(d) + os.sep for d in exclude_dirs)

    def is_excluded(path: str) -> bool:
        return bool(excluded) and (os.path.realpath(path) + os.sep).startswith(excluded)

    for inp in inputs:
        matches = sorted(glob.glob(inp, recursive=True)) if glob.has_magic(inp) else [inp]
        if not matches or not all(os.path.exists(m) for m in matches):
            missing.append((inp, "no such file or directory"))
            continue
        for m in matches:
            if is_excluded(m):
                missing.append((m, "inside the output folder"))
            elif os.path.isdir(m):
                for root, dirs, names in os.walk(m):
                    dirs[:] = [d for d in dirs if not d.startswith(".") and not is_excluded(os.path.join(root, d))]
                    for n in names:
                        if not n.startswith(".") and (include is None or fnmatch.fnmatch(n, include)):
                            f = os.path.join(root, n)
                            if os.path.islink(f) and is_excluded(f):  # os.walk does not enter linked folders
                                missing.append((f, "inside the output folder"))
                            else:
                                files.add(f)
            else:
                files.add(m)
    return sorted(files), missing


def _field(obj, dotted: str):
    for part in dotted.split("."):
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _as_bytes(value) -> bytes | None:
    if isinstance(value, str):
        # surrogatepass: lone surrogates in JSON survive as (invalid UTF-8) bytes instead of failing
        return value.encode("utf-8", "surrogatepass")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    return None


def read_documents(path: str, opts: WriterOptions, summary: WriteSummary) -> Iterator[bytes]:
    """Documents of one input file, as raw bytes. Problems are recorded in `summary`."""
    name = path.lower()
    if name.endswith((".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")):
        opener = gzip.open if name.endswith(".gz") else open
        bad = missing = 0
        with opener(path, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    value = _as_bytes(_field(json.loads(line), opts.text_field))
                except (ValueError, UnicodeDecodeError):
                    bad += 1
                    continue
                if value is None:
                    missing += 1
                    continue
                yield value
        if bad:
            summary.skipped_files.append((path, f"{bad} line(s) not valid JSON"))
        if missing:
            summary.skipped_files.append((path, f"{missing} record(s) without a string field {opts.text_field!r}"))
    elif name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise RuntimeError("reading .parquet needs pyarrow (pip install pyarrow)") from e
        pf = pq.ParquetFile(path)
        if opts.column not in pf.schema_arrow.names:
            summary.skipped_files.append((path, f"no column {opts.column!r} (has {pf.schema_arrow.names})"))
            return
        for batch in pf.iter_batches(columns=[opts.column], batch_size=4096):
            for value in batch.column(0).to_pylist():
                data = _as_bytes(value)
                if data is None:
                    summary.skip_doc("null value")
                    continue
                yield data
    else:
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read()
        if not data:
            summary.skipped_files.append((path, "empty file"))
            return
        if opts.split_on:
            yield from data.split(opts.split_on)
        else:
            yield data


def _in_val(data: bytes, fraction: float) -> bool:
    # by content: the split of a document never depends on its position, and duplicates stay together
    if fraction <= 0:
        return False
    h = int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
    return h < fraction * 2 ** 64


class OutputExistsError(RuntimeError):
    pass


def _split_dirs(out_dir: str) -> list[str]:
    return [os.path.join(out_dir, split) for split in ("train", "val")]


def _earlier_run(out_dir: str, prefix: str) -> dict[str, list[str]]:
    """{split dir: names of an earlier run's index.json, shards and temporaries in it}."""
    shard_name = re.compile(re.escape(prefix) + r"-\d{6}\.tar$")
    tmp_name = re.compile(r"\." + re.escape(prefix) + r"-\d{6}\.tar\.tmp\.\d+$")
    found = {}
    for d in _split_dirs(out_dir):
        if os.path.isdir(d):
            names = [n for n in os.listdir(d) if n == "index.json" or shard_name.match(n) or tmp_name.match(n)]
            if names:
                found[d] = names
    return found


def check_output(out_dir: str, prefix: str, overwrite: bool) -> None:
    """Refuse an output folder holding an earlier run's shards (or a crashed run's temporaries,
    which may belong to a writer still running) unless `overwrite`. Called before any input is read."""
    found = _earlier_run(out_dir, prefix)
    if found and not overwrite:
        d, names = next(iter(found.items()))
        raise OutputExistsError(f"{d} already holds files of an earlier run ({', '.join(sorted(names)[:3])}"
                                f"{', ...' if len(names) > 3 else ''}); choose another output folder "
                                f"or pass --overwrite")


def clear_earlier_run(out_dir: str, prefix: str) -> None:
    """Delete an earlier run's files; called only once the new run has a document to write.

    Writing over them in place would leave the old index.json describing new shards until the
    very end: a crash, or a job reading the old shards, would then meet files that do not match
    their index. So the old index goes first (no index = visibly incomplete), then the shards."""
    for d, names in _earlier_run(out_dir, prefix).items():
        if "index.json" in names:
            os.remove(os.path.join(d, "index.json"))
        for n in names:
            if n != "index.json":
                os.remove(os.path.join(d, n))


class NothingToWriteError(RuntimeError):
    pass


def write_shards(documents, out_dir: str, opts: WriterOptions, summary: WriteSummary | None = None,
                 source_note: dict | None = None) -> WriteSummary:
    """Write an iterable of document bytes into OUT_DIR/train (and OUT_DIR/val) shards + index.json.

    Raises OutputExistsError (before reading anything) when OUT_DIR holds an earlier run and
    opts.overwrite is off, and NothingToWriteError when no document was usable: OUT_DIR is then
    left as it was, so a mistyped input never replaces a good dataset with an empty one."""
    summary = summary or WriteSummary()
    check_output(out_dir, opts.prefix, opts.overwrite)
    t0 = time.perf_counter()
    writers = {}

    def writer(split: str) -> TarShardWriter:
        if not writers:  # the first usable document: only now may an earlier run go
            clear_earlier_run(out_dir, opts.prefix)
            for sp in ("train", "val") if opts.val_fraction > 0 else ("train",):
                writers[sp] = TarShardWriter(os.path.join(out_dir, sp), opts.prefix, opts.shard_size)
        return writers[split]

    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(unit="B", unit_scale=True, unit_divisor=1000, desc="sharding", file=sys.stderr)
    n = 0
    for data in documents:
        n += 1
        if bar is not None:
            bar.update(len(data))
        if not data:
            summary.skip_doc("empty")
            continue
        if len(data) < opts.min_doc_bytes:
            summary.skip_doc(f"shorter than {opts.min_doc_bytes} bytes")
            continue
        if opts.max_doc_bytes is not None and len(data) > opts.max_doc_bytes:
            summary.long_docs += 1
            if opts.long_docs == "drop":
                summary.skip_doc(f"longer than {opts.max_doc_bytes} bytes")
                continue
            if opts.long_docs == "truncate":
                data = data[: opts.max_doc_bytes]
        split = "val" if _in_val(data, opts.val_fraction) else "train"
        writer(split).add(f"d{n - 1:010d}", data)
        summary.documents[split] += 1
        summary.bytes[split] += len(data)
    if bar is not None:
        bar.close()
    summary.seconds = time.perf_counter() - t0
    if not writers:
        raise NothingToWriteError(f"no usable document in the inputs; {out_dir} left as it was\n{summary.text()}")
    extra = {"source": source_note or {}}
    for split, w in writers.items():
        meta = w.finish(split, extra)
        summary.shards[split] = len(meta["shards"])
    summary.seconds = time.perf_counter() - t0
    return summary


def shard_files(inputs: list[str], out_dir: str, opts: WriterOptions) -> WriteSummary:
    """The CLI's work: expand inputs, read their documents in sorted file order, write shards."""
    summary = WriteSummary()
    check_output(out_dir, opts.prefix, opts.overwrite)  # before reading any input
    files, missing = expand_inputs(inputs, opts.include, exclude_dirs=_split_dirs(out_dir))
    summary.skipped_files.extend(missing)

    def docs():
        for path in files:
            try:
                yield from read_documents(path, opts, summary)
            except (OSError, EOFError, ValueError, RuntimeError, zlib.error) as e:  # zlib: damaged .gz
                # a file that breaks half way keeps the documents read before the break
                summary.skipped_files.append((path, f"unreadable: {e}"))

    note = {"inputs": list(inputs), "files": len(files)}
    return write_shards(docs(), out_dir, opts, summary, note)


def shard_demo(out_dir: str, opts: WriterOptions, max_bytes: int | None = None) -> WriteSummary:
    from .corpus import DEFAULT_DEMO_BYTES, demo_documents

    docs = (data for _name, data in demo_documents(max_bytes or DEFAULT_DEMO_BYTES))
    note = {"demo": "python stdlib sources + pydoc_data topics", "python": sys.version.split()[0]}
    return write_shards(docs, out_dir, opts, None, note)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m data_pipeline.shard",
        description="Write WebDataset byte shards (OUT_DIR/train/*.tar + index.json, OUT_DIR/val/...) "
                    "from text files, directories, globs, .jsonl(.gz) and .parquet files.")
    ap.add_argument("out_dir", help="output folder (gets train/ and, with --val-fraction, val/)")
    ap.add_argument("inputs", nargs="*", help="files, directories or glob patterns")
    ap.add_argument("--demo", action="store_true",
                    help="shard the embedded demo corpus (Python stdlib sources + pydoc topics)")
    ap.add_argument("--demo-bytes", type=parse_size, default=None, help="demo corpus size (default 4MB; the ~465KB of pydoc topics are always in)")
    ap.add_argument("--shard-size", type=parse_size, default=None,
                    help="target tar size (default 256MB; 256KB with --demo)")
    ap.add_argument("--val-fraction", type=float, default=None,
                    help="share of documents for OUT_DIR/val (default 0; 0.05 with --demo)")
    ap.add_argument("--text-field", default="text", help="jsonl field holding the text (dotted path)")
    ap.add_argument("--column", default="text", help="parquet column holding the text")
    ap.add_argument("--min-doc-bytes", type=parse_size, default=1)
    ap.add_argument("--max-doc-bytes", type=parse_size, default=None)
    ap.add_argument("--long-docs", choices=["keep", "truncate", "drop"], default="keep",
                    help="documents over --max-doc-bytes: keep (split into micro-batches later), "
                         "truncate, or drop")
    ap.add_argument("--split-on", default=None,
                    help="separator that splits plain text files into documents, with escapes, "
                         "e.g. '\\n\\n\\n' or '<|endoftext|>' (default: one file = one document)")
    ap.add_argument("--include", default=None, help="only files matching this glob inside directories")
    ap.add_argument("--prefix", default="shard", help="shard file name prefix")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the shards and index.json of an earlier run in OUT_DIR (refused otherwise)")
    a = ap.parse_args(argv)
    if not (0.0 <= (a.val_fraction or 0.0) < 1.0):
        ap.error("--val-fraction must be in [0, 1)")
    if a.demo and a.inputs:
        ap.error("--demo takes no inputs")
    if not a.demo and not a.inputs:
        ap.error("give input files/directories, or --demo")
    split_on = codecs.escape_decode(a.split_on.encode("utf-8"))[0] if a.split_on else None
    opts = WriterOptions(
        shard_size=a.shard_size or (256_000 if a.demo else 256_000_000),
        val_fraction=a.val_fraction if a.val_fraction is not None else (0.05 if a.demo else 0.0),
        min_doc_bytes=max(1, a.min_doc_bytes), max_doc_bytes=a.max_doc_bytes, long_docs=a.long_docs,
        text_field=a.text_field, column=a.column, split_on=split_on, prefix=a.prefix,
        include=a.include, progress=not a.quiet, overwrite=a.overwrite)
    try:
        if a.demo:
            summary = shard_demo(a.out_dir, opts, a.demo_bytes)
        else:
            summary = shard_files(a.inputs, a.out_dir, opts)
    except OutputExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NothingToWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(summary.text())
    for split in ("train", "val"):
        if split == "train" or summary.documents[split]:
            print(f"index: {os.path.join(a.out_dir, split, 'index.json')}")
    return 0 if summary.documents["train"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
