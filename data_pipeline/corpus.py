"""The embedded demo corpus: text that exists on every machine with Python, no download.

Python's own standard-library sources (code, comments, docstrings) plus the `pydoc_data` topic
texts (English prose about the language). Deterministic for a given Python version: files are
taken in sorted path order until the byte budget is spent.
"""
from __future__ import annotations

import os
import sysconfig
from typing import Iterator

# Packages left out: tests and GUI demos are large and repetitive; site-packages is not stdlib.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__",
              "lib2to3", "tkinter", "turtledemo", "ensurepip", "config-3.11-x86_64-linux-gnu"}

DEFAULT_DEMO_BYTES = 4_000_000


def demo_documents(max_bytes: int = DEFAULT_DEMO_BYTES) -> Iterator[tuple[str, bytes]]:
    """Yield (source name, raw bytes) documents, about `max_bytes` in total.

    The pydoc topics come first, always all of them (one document per topic, ~465 KB), then
    stdlib .py files (one per file) while the budget lasts.
    """
    import pydoc_data.topics as topics

    budget = max_bytes
    for name in sorted(topics.topics):
        data = topics.topics[name].encode("utf-8")
        if data:
            budget -= len(data)
            yield f"pydoc_data/{name}", data
    stdlib = sysconfig.get_paths()["stdlib"]
    for rel in _stdlib_sources(stdlib):
        if budget <= 0:
            return
        with open(os.path.join(stdlib, rel), "rb") as f:
            data = f.read()
        if data:
            budget -= len(data)
            yield f"stdlib/{rel}", data


def _stdlib_sources(stdlib: str) -> list[str]:
    out = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        for f in files:
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(root, f), stdlib))
    return sorted(out)
