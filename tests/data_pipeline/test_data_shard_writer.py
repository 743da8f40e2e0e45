"""Shard writer: bytes in == bytes out, every input kind, tar -tf and webdataset read the shards."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from data_pipeline.index import file_sha256, load_index
from data_pipeline.shard import WriterOptions, parse_size, shard_demo, shard_files
from data_pipeline.tario import iter_samples

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _read_all(index_path: str) -> dict[str, bytes]:
    meta, shards = load_index(index_path)
    out = {}
    for entry, s in zip(meta["shards"], shards):
        n = nbytes = 0
        for key, doc in iter_samples(s.url):
            assert key not in out
            out[key] = doc
            n += 1
            nbytes += len(doc)
        assert (n, nbytes) == (entry["samples"], entry["bytes"]) == (s.samples, s.bytes)
        assert entry["sha256"] == file_sha256(s.url)
        assert entry["file_bytes"] == os.path.getsize(s.url)
    return out


@pytest.fixture
def inputs(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    docs = {}
    docs["a.txt"] = "héllo wörld\n".encode() * 50
    docs["sub/latin1.txt"] = "caf\xe9 na\xefve".encode("latin-1")          # not UTF-8
    docs["sub/bin.dat"] = bytes(range(256)) * 4 + b"\xff\xfe\x00\x80"      # every byte value
    docs["big.txt"] = rng.integers(0, 256, 3_000_000, dtype=np.uint8).tobytes()  # > shard size
    for name, data in docs.items():
        (src / name).write_bytes(data)
    (src / "empty.txt").write_bytes(b"")
    (src / ".hidden").write_bytes(b"ignored")
    recs = [{"text": "first record \u2603"}, {"text": "second"}, {"other": 1}, {"text": "lone \udc80"}]
    lines = [json.dumps(r) for r in recs] + ["{not json"]
    (src / "docs.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(src / "more.jsonl.gz", "wt") as f:
        f.write(json.dumps({"meta": {"body": "nested gz"}, "text": "gz text"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["pq one", None, "pq two \u00e9"], "id": [1, 2, 3]}),
                   src / "table.parquet")
    expected_other = [b"first record \xe2\x98\x83", b"second", "lone \udc80".encode("utf-8", "surrogatepass"),
                      b"gz text", b"pq one", "pq two \u00e9".encode()]
    return src, docs, expected_other


def test_round_trip_every_input_kind(tmp_path, inputs):
    src, docs, expected_other = inputs
    opts = WriterOptions(shard_size=1_000_000, column="content", progress=False)
    summary = shard_files([str(src)], str(tmp_path / "out"), opts)
    got = _read_all(str(tmp_path / "out" / "train" / "index.json"))
    # bytes in == bytes out, for every document, whatever its encoding
    values = list(got.values())
    for data in list(docs.values()) + expected_other:
        assert data in values, data[:40]
    assert len(values) == len(docs) + len(expected_other)
    # keys follow the sorted input order: stable across runs
    assert all(len(k) == 11 and k[0] == "d" and k[1:].isdigit() for k in got)
    # skipped and reported: the empty file, the bad JSON line, the record without the field, the null
    why = {os.path.basename(p): w for p, w in summary.skipped_files}
    assert why["empty.txt"] == "empty file"
    assert "not valid JSON" in " ".join(w for p, w in summary.skipped_files if p.endswith("docs.jsonl"))
    assert "without a string field" in " ".join(w for p, w in summary.skipped_files if p.endswith("docs.jsonl"))
    assert summary.skipped_docs.get("null value") == 1
    assert "skipped file" in summary.text() and "empty file" in summary.text()
    # the 3 MB document is one sample in a shard of its own; the other shards respect the size
    _, shards = load_index(str(tmp_path / "out" / "train" / "index.json"))
    assert len(shards) >= 2
    for s in shards:
        assert os.path.getsize(s.url) <= 1_000_000 or s.samples == 1
    assert not [f for f in os.listdir(tmp_path / "out" / "train") if ".tmp" in f]  # nothing half-written


def test_cli_deterministic_tar_and_webdataset(tmp_path, inputs):
    src, docs, _ = inputs
    outs = []
    for run in ("r1", "r2"):
        out = tmp_path / run
        r = subprocess.run([sys.executable, "-m", "data_pipeline.shard", str(out), str(src / "*.txt"),
                            str(src / "sub"), "--shard-size", "64KB", "--val-fraction", "0.3", "--quiet"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "documents" in r.stdout and "skipped file" in r.stdout
        outs.append(out)
    for split in ("train", "val"):
        m1 = json.loads((outs[0] / split / "index.json").read_text())
        m2 = json.loads((outs[1] / split / "index.json").read_text())
        assert [e["sha256"] for e in m1["shards"]] == [e["sha256"] for e in m2["shards"]]  # deterministic
    together = {**_read_all(str(outs[0] / "train" / "index.json")), **_read_all(str(outs[0] / "val" / "index.json"))}
    assert sorted(together.values()) == sorted(docs.values())
    # tar -tf lists the members; webdataset reads the samples with the same bytes
    _, shards = load_index(str(outs[0] / "train" / "index.json"))
    listing = subprocess.run(["tar", "-tf", shards[0].url], capture_output=True, text=True, check=True).stdout.split()
    assert listing and all(n.endswith(".bin") for n in listing)
    tv = subprocess.run(["tar", "-tvf", shards[0].url], capture_output=True, text=True, check=True).stdout
    assert "1970-01-01" in tv  # fixed mtimes
    import webdataset as wds

    urls = [s.url for s in shards]
    seen = {s["__key__"]: s["bin"] for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)}
    assert seen == _read_all(str(outs[0] / "train" / "index.json"))


def test_long_docs_and_min_size(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"x" * 5000)
    (src / "b.txt").write_bytes(b"yy")
    (src / "c.txt").write_bytes(b"z" * 100)
    (src / "d.txt").write_bytes(b"doc one<SEP>doc two<SEP><SEP>doc three")
    for policy, expect in [("keep", 5000), ("truncate", 1000), ("drop", None)]:
        out = tmp_path / policy
        r = subprocess.run([sys.executable, "-m", "data_pipeline.shard", str(out), str(src), "--quiet",
                            "--max-doc-bytes", "1000", "--long-docs", policy, "--min-doc-bytes", "3",
                            "--split-on", "<SEP>"], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        vals = sorted(_read_all(str(out / "train" / "index.json")).values(), key=len)
        assert b"yy" not in vals                       # under --min-doc-bytes
        assert vals[:3] == [b"doc one", b"doc two", b"doc three"]  # split on the separator, empty part skipped
        assert b"z" * 100 in vals
        longest = [v for v in vals if v.startswith(b"x")]
        assert (len(longest[0]) if longest else None) == expect


def test_demo_corpus_is_fast_and_split(tmp_path):
    t0 = time.perf_counter()
    summary = shard_demo(str(tmp_path / "demo"), WriterOptions(shard_size=256_000, val_fraction=0.05, progress=False))
    assert time.perf_counter() - t0 < 10
    assert summary.documents["train"] > 100 and summary.documents["val"] > 0
    assert 2_000_000 < sum(summary.bytes.values()) < 6_000_000
    meta, shards = load_index(str(tmp_path / "demo" / "train" / "index.json"))
    assert len(shards) >= 8
    assert meta["samples"] == summary.documents["train"]


def test_shardwriter_txt_shards_indexed_and_read(tmp_path):
    """Shards from webdataset.ShardWriter with .txt members read like our own."""
    import webdataset as wds

    texts = [f"document {i} " * (i + 1) for i in range(30)]
    pattern = str(tmp_path / "wds-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=10, verbose=0) as sink:
        for i, t in enumerate(texts):
            sink.write({"__key__": f"sample{i:04d}", "txt": t, "json": {"i": i}})
    tars = sorted(str(p) for p in tmp_path.glob("wds-*.tar"))
    r = subprocess.run([sys.executable, "-m", "data_pipeline.index", *tars, "-o", str(tmp_path / "index.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    got = _read_all_loose(str(tmp_path / "index.json"))
    assert sorted(got.values()) == sorted(t.encode() for t in texts)
    r = subprocess.run([sys.executable, "-m", "data_pipeline.index", "--verify", str(tmp_path / "index.json")],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout


def _read_all_loose(index_path):
    _, shards = load_index(index_path)
    return {k: d for s in shards for k, d in iter_samples(s.url)}


def test_parse_size():
    assert parse_size("256MB") == 256_000_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size("64KB") == 64_000
    assert parse_size("4096") == 4096


def test_damaged_gzip_input_is_skipped_and_reported(tmp_path):
    """A .gz whose deflate stream is damaged raises zlib.error, not OSError: skipped, not fatal."""
    import gzip as _gzip

    src = tmp_path / "in" / "c"
    src.mkdir(parents=True)
    (src / "good.txt").write_bytes(b"good document")
    blob = bytearray(_gzip.compress(b"x" * 5000 + bytes(range(256)) * 40))
    blob[20:40] = b"\xff" * 20  # corrupt the deflate stream, keep the header
    (src / "bad.txt.gz").write_bytes(bytes(blob))
    summary = shard_files([str(tmp_path / "in")], str(tmp_path / "out"), WriterOptions(progress=False))
    assert summary.documents["train"] == 1
    assert any("bad.txt.gz" in path for path, _why in summary.skipped_files)


def test_output_folder_of_an_earlier_run(tmp_path):
    """A second run into the same folder is refused unless --overwrite; with it the old index,
    the old shards (even when the new run writes fewer) and a crashed run's temporaries go."""
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        (src / f"{i}.txt").write_bytes(bytes([65 + i]) * 3000)
    out = tmp_path / "out"

    def cli(*extra):
        return subprocess.run([sys.executable, "-m", "data_pipeline.shard", str(out), *extra, "--quiet",
                               "--shard-size", "8KB"], cwd=ROOT, capture_output=True, text=True, timeout=60)

    assert cli(str(src)).returncode == 0
    first = json.loads((out / "train" / "index.json").read_text())
    assert len(first["shards"]) == 6
    (out / "train" / ".shard-000009.tar.tmp.4242").write_bytes(b"half a shard")
    r = cli(str(src / "0.txt"))
    assert r.returncode == 2 and "--overwrite" in r.stderr and "earlier run" in r.stderr
    assert json.loads((out / "train" / "index.json").read_text()) == first  # nothing touched
    for bad_input in (str(tmp_path / "typo"), str(src / "*.none")):  # nothing to write: nothing replaced
        r = cli(bad_input, "--overwrite")
        assert r.returncode == 1 and "left as it was" in r.stderr
        assert json.loads((out / "train" / "index.json").read_text()) == first
    assert cli(str(src / "0.txt"), "--overwrite").returncode == 0
    assert sorted(os.listdir(out / "train")) == ["index.json", "shard-000000.tar"]
    assert _read_all(str(out / "train" / "index.json")) == {"d0000000000": b"A" * 3000}


def test_output_folder_inside_an_input_directory_is_not_read(tmp_path):
    """The writer's own OUT_DIR/train and OUT_DIR/val are never inputs; the rest of OUT_DIR may be."""
    src = tmp_path / "corpus"
    src.mkdir()
    (src / "a.txt").write_bytes(b"first document")
    (src / "b.txt").write_bytes(b"second document")
    docs = [b"first document", b"second document"]
    out = src / "shards"
    for _ in range(2):  # the second run would otherwise read the first run's tars as documents
        summary = shard_files([str(src)], str(out), WriterOptions(progress=False, overwrite=True))
        assert summary.documents["train"] == 2
    assert sorted(_read_all(str(out / "train" / "index.json")).values()) == docs
    (out / "notes.txt").write_bytes(b"third document")  # beside train/: an input like any other
    os.symlink(out / "train" / "shard-000000.tar", src / "link.tar")  # a linked shard is not
    summary = shard_files([str(src / "*"), str(out / "train")], str(out), WriterOptions(progress=False, overwrite=True))
    assert sorted(_read_all(str(out / "train" / "index.json")).values()) == docs + [b"third document"]
    assert sum(why == "inside the output folder" for _p, why in summary.skipped_files) == 2
    for _ in range(2):  # OUT_DIR == the input directory
        summary = shard_files([str(src / "shards")], str(src / "shards"), WriterOptions(progress=False, overwrite=True))
        assert summary.documents["train"] == 1  # notes.txt
