"""The shard parser agrees with tarfile and reports damage with shard and key."""
from __future__ import annotations

import io
import tarfile

import pytest

from data_pipeline.tario import DataError, iter_samples


def _tar(path, members, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            if data is None:
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
                continue
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_formats_prefixes_and_long_names(tmp_path, fmt):
    long_dir = "deep/" + "x" * 120  # needs the ustar prefix field, a GNU longname or a pax header
    members = [("dir", None), ("a.bin", b"\x00\xffraw"), ("a.json", b"{}"), (f"{long_dir}/b.txt", b"text"),
               (f"{long_dir}/b.bin", b"bin wins"), ("c.txt", "ünï".encode())]
    if fmt == tarfile.USTAR_FORMAT:
        members[3] = ("p" * 90 + "/" + "q" * 60 + "/b.txt", b"text")
        members[4] = ("p" * 90 + "/" + "q" * 60 + "/b.bin", b"bin wins")
        long_dir = "p" * 90 + "/" + "q" * 60
    _tar(tmp_path / "s.tar", members, fmt)
    got = list(iter_samples(str(tmp_path / "s.tar")))
    assert got == [("a", b"\x00\xffraw"), (f"{long_dir}/b", b"bin wins"), ("c", "ünï".encode())]


def test_damage_is_reported_with_shard_and_key(tmp_path):
    _tar(tmp_path / "s.tar", [(f"k{i}.bin", bytes([i]) * 700) for i in range(4)])
    data = (tmp_path / "s.tar").read_bytes()
    bad = bytearray(data)
    bad[2 * 1536 + 10] ^= 0xFF  # the third header's name: checksum no longer matches
    (tmp_path / "hdr.tar").write_bytes(bytes(bad))
    got = []
    with pytest.raises(DataError, match="bad header checksum") as e:
        for s in iter_samples(str(tmp_path / "hdr.tar")):
            got.append(s[0])
    assert got == ["k0", "k1"] and e.value.key == "k1" and "hdr.tar" in str(e.value)
    (tmp_path / "cut.tar").write_bytes(data[: 1536 + 600])  # inside k1's data
    with pytest.raises(DataError, match="cut short"):
        list(iter_samples(str(tmp_path / "cut.tar")))
    with pytest.raises(DataError, match="cannot open"):
        list(iter_samples(str(tmp_path / "missing.tar")))
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(DataError, match="empty"):
        list(iter_samples(str(tmp_path / "empty.tar")))
    with pytest.raises(DataError):
        list(iter_samples(f"pipe:cat {tmp_path / 'missing.tar'}"))


def test_reader_holds_a_shard_once(tmp_path):
    """The reader keeps a whole shard in memory for its in-shard permutation; its documents are
    views of the one shard buffer, and the previous shard is dropped before the next loads, so
    the peak is about one shard size, not two (256 MB more per worker with 256 MB shards).
    Measured in a fresh process by its peak RSS over a stream of 3 shards."""
    import os
    import subprocess
    import sys

    from dp_testutil import write_shard_set

    docs = [os.urandom(10_000) for _ in range(3 * 2000)]
    index, _ = write_shard_set(str(tmp_path), docs, docs_per_shard=2000)
    size = os.path.getsize(tmp_path / "shard-000000.tar")
    # VmHWM (this process's peak RSS), not ru_maxrss: the latter keeps the forking pytest's peak
    code = ("import re\n"
            "from data_pipeline.index import load_index\n"
            "hwm = lambda: int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024\n"
            "from data_pipeline.reader import fresh_plans, iter_stream\n"
            f"shards = load_index({index!r})[1]\n"
            "before = hwm()\n"
            "events = iter_stream(shards, fresh_plans(3, 0, 0, 1)[0], [0, 0], 0, 0, 0, 1, 1, 'fail')\n"
            "n = sum(ev[0] == 'doc' for ev in events)\n"
            "assert n == 6000, n\n"
            "print(hwm() - before)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert r.returncode == 0, r.stderr
    growth = int(r.stdout)
    assert growth < 1.4 * size, f"reading {size / 1e6:.0f} MB shards grew the peak RSS by {growth / 1e6:.0f} MB"
