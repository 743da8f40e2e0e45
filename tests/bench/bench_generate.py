"""Generation benchmark: cached incremental decoding vs recomputing the whole prefix each byte.

    .venv/bin/python tests/bench/bench_generate.py   (or `make bench`)

Greedy decoding of 512 bytes after a 64-byte prompt, batch 1 and 8, the tiny and small configs
at their initialisation (random weights: the chunking is what an untrained router does), CPU,
one thread per process as `make` sets. Both paths produce the same bytes (asserted here, and in
tests/model/test_inference.py). Writes bench-results/generate.json.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pretrain.config import load_config  # noqa: E402
from pretrain.model import HNetConfig, HNetForCausalLM  # noqa: E402
from pretrain.sample import generate, generate_recompute  # noqa: E402

NEW_BYTES, PROMPT = 512, 64


def model_of(name: str) -> HNetForCausalLM:
    cfg = load_config(str(REPO / "pretrain" / "configs" / f"{name}.yaml"), [], validate=False)
    torch.manual_seed(0)
    return HNetForCausalLM(HNetConfig.from_dict(cfg.model_dict())).eval()


def main() -> None:
    rows = []
    for name in ("tiny", "small"):
        model = model_of(name)
        for batch in (1, 8):
            g = torch.Generator().manual_seed(batch)
            prompts = [bytes(torch.randint(32, 127, (PROMPT,), generator=g).tolist()) for _ in range(batch)]
            t0 = time.perf_counter()
            gens, stats = generate(model, prompts, NEW_BYTES, temperature=0.0, eos=None)
            cached_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = generate_recompute(model, prompts, NEW_BYTES)
            recompute_s = time.perf_counter() - t0
            assert [bytes(x.output) for x in gens] == ref, f"{name} batch {batch}: the two paths disagree"
            row = {"config": name, "batch": batch, "new_bytes": NEW_BYTES, "prompt_bytes": PROMPT,
                   "cached_bytes_per_s": batch * NEW_BYTES / cached_s,
                   "recompute_bytes_per_s": batch * NEW_BYTES / recompute_s,
                   "speedup": recompute_s / cached_s,
                   "inner_level_ran_fraction": stats["inner_level_ran_fraction"]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    os.makedirs(REPO / "bench-results", exist_ok=True)
    (REPO / "bench-results" / "generate.json").write_text(json.dumps({"threads": torch.get_num_threads(),
                                                                      "results": rows}, indent=1))


if __name__ == "__main__":
    main()
