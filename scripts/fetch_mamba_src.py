"""Unpack mamba-ssm's Python sources (no compiled extension) into DEST/mamba_ssm.

mamba-ssm's Triton kernels (the chunked SSD scan the model's fused path calls) are plain Python
files; only its package __init__ and a few modules need the CUDA extension. Two users:
  - scripts/gpu_wheels.sh, for the GPU check on a machine with no network;
  - `make setup`, for the tests that run those kernels under Triton's interpreter on a CPU
    (tests/model/triton_interpreter.py).
pip cannot download mamba-ssm's sdist here (building its metadata wants CUDA), so the file is
taken from the package index's simple page (PIP_INDEX_URL, default PyPI).

    python scripts/fetch_mamba_src.py DEST [VERSION]
"""
from __future__ import annotations

import io
import os
import re
import shutil
import sys
import tarfile
import urllib.parse
import urllib.request
from pathlib import Path

DEFAULT_VERSION = "2.3.2.post1"


def fetch(dest: Path, version: str = DEFAULT_VERSION) -> int:
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page = urllib.request.urlopen(f"{index}/mamba-ssm/", timeout=60).read().decode()
    links = re.findall(r'href="([^"#]*mamba_ssm-' + re.escape(version) + r'\.tar\.gz)', page)
    if not links:
        raise SystemExit(f"no mamba_ssm-{version}.tar.gz in {index}/mamba-ssm/")
    data = urllib.request.urlopen(urllib.parse.urljoin(f"{index}/mamba-ssm/", links[0]), timeout=120).read()
    top = f"mamba_ssm-{version}/mamba_ssm/"
    staging = dest.with_name(dest.name + ".partial")  # a failed fetch leaves no half tree behind
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(top) and m.name.endswith(".py")]
        for m in members:
            m.name = "mamba_ssm/" + m.name[len(top):]
        tar.extractall(staging, members=members, filter="data")
    (staging / "mamba_ssm" / "VERSION").write_text(version + "\n")
    shutil.rmtree(dest / "mamba_ssm", ignore_errors=True)
    dest.mkdir(parents=True, exist_ok=True)
    (staging / "mamba_ssm").rename(dest / "mamba_ssm")
    staging.rmdir()
    return len(members)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit(__doc__)
    out, ver = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) == 3 and sys.argv[2] else DEFAULT_VERSION)
    print(f"mamba-ssm {ver}: {fetch(out, ver)} source files in {out}/mamba_ssm")
