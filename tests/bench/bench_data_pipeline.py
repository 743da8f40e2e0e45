"""Data pipeline benchmark: reader+packer throughput vs raw tarfile, packing efficiency, balance.

    .venv/bin/python tests/bench/bench_data_pipeline.py   (or `make bench`)

Writes bench-results/data_pipeline.json. Figures:
- throughput: MB/s of the reader's tar parser alone, and MB/s of real bytes out of BalancedStepLoader (read, permute, pack into MicroBatch
  tensors, balance) with 0 (in-process), 1 and 2 worker processes, against iterating the same
  tars with Python's tarfile (reading every member) in the same run, on the demo corpus. The
  loader's rate is measured from its first step on (start-up, reported apart, is a one-off), and
  the CPU time per MB of the consumer and of the workers says what a machine with more cores
  than this one could reach (the workers' figure includes starting their interpreters).
- packing efficiency (real bytes / row capacity) on the demo corpus at 8192 and 65536 bytes per
  micro-batch, 8 micro-batches per step, over 2 epochs' worth of steps.
- imbalance (max/mean estimated cost per rank) with 8 simulated ranks on the demo corpus, LPT
  balancing vs dealing documents round-robin, cost from the H-Net 2-stage L FLOP model.
"""
from __future__ import annotations

import itertools
import json
import os
import platform
import resource
import sys
import tarfile
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402

from data_pipeline import BalancedStepLoader, Piece, WriterOptions, plan_step, shard_demo  # noqa: E402
from data_pipeline.balance import imbalance, round_robin_costs  # noqa: E402
from data_pipeline.index import load_index  # noqa: E402
from data_pipeline.packer import split_piece  # noqa: E402
from data_pipeline.tario import iter_samples  # noqa: E402
from pretrain.model.flops import DocCostModel  # noqa: E402  (the trainer hands the loader this cost)

EPOCHS = 250  # passes over the ~4 MB demo corpus per throughput measurement (about 1 GB: a window of
#               about a second, short ones were noisy by +-20%)


def raw_tarfile_mb_s(urls: list[str]) -> float:
    t0, n = time.perf_counter(), 0
    for _ in range(EPOCHS):
        for u in urls:
            with tarfile.open(u) as tar:
                for m in tar:
                    if m.isfile():
                        n += len(tar.extractfile(m).read())
    return n / (time.perf_counter() - t0) / 1e6


def shard_parser_mb_s(urls: list[str]) -> float:
    """The reader's own tar parsing (data_pipeline.tario.iter_samples) on the same tars."""
    t0, n = time.perf_counter(), 0
    for _ in range(EPOCHS):
        for u in urls:
            for _key, doc in iter_samples(u):
                n += len(doc)
    return n / (time.perf_counter() - t0) / 1e6


def loader_throughput(index: str, workers: int) -> dict:
    """Steady-state MB/s (from the first step on), start-up seconds, CPU ms per MB by process."""
    C = 65536
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu0, t0 = time.process_time(), time.perf_counter()
    loader = BalancedStepLoader([index], C, 8 * C, num_workers=workers, epochs=EPOCHS)
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = sum(s.global_bytes for s in it)
    t2 = time.perf_counter()
    loader.close()
    cpu = time.process_time() - cpu0
    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    child_cpu = sum(getattr(children1, f) - getattr(children0, f) for f in ("ru_utime", "ru_stime"))
    mb = n / 1e6
    return {"mb_s": mb / (t2 - t1), "startup_s": t1 - t0,
            "consumer_cpu_ms_per_mb": 1e3 * cpu / mb, "workers_cpu_ms_per_mb": 1e3 * child_cpu / mb}


def packing_efficiency(index: str, C: int, n_docs_bytes: int) -> dict:
    M = 8
    steps = max(4, 2 * n_docs_bytes // (M * C))
    loader = BalancedStepLoader([index], C, M * C, num_workers=0)
    effs, real, cap = [], 0, 0
    for s in itertools.islice(loader, steps):
        effs.append(s.metrics["data/packing_efficiency"])
        real += s.global_bytes
        cap += M * C
    return {"micro_batch_bytes": C, "micro_batches_per_step": M, "steps": len(effs),
            "efficiency_overall": real / cap, "efficiency_min_step": min(effs)}


def cost_model() -> tuple[DocCostModel, str]:
    from pretrain.model import HNetConfig

    cfg = HNetConfig.from_json(os.path.join(ROOT, "tests", "fixtures", "hnet_2stage_L.json"))
    if not getattr(cfg, "ratio_targets", None):
        cfg = HNetConfig.from_dict({**cfg.to_dict(), "ratio_targets": [3.0, 3.0]})
    return DocCostModel.from_model_config(cfg), "H-Net 2-stage L FLOPs (pretrain.model.document_cost_terms)"


def simulated_ranks(index: str, R: int = 8, M: int = 4, C: int = 8192, steps: int = 40) -> dict:
    _, shards = load_index(index)
    docs = [Piece(f"{s.name}:{k}", d) for s in shards for k, d in iter_samples(s.url) if d]
    rng = np.random.default_rng(0)
    cm, cm_name = cost_model()
    stream = (docs[i] for _ in itertools.count() for i in rng.permutation(len(docs)))
    carry, lpt, rr, rr_bytes, eff = [], [], [], [], []
    for _ in range(steps):
        window = list(carry)
        have = sum(p.length for p in window)
        while have < 1.25 * R * M * C:
            for p in split_piece(next(stream), C):
                window.append(p)
                have += p.length
        plan = plan_step(window, len(carry), R, M, C, cm)
        placed = sorted(i for b in plan.part.bins for i in b)
        carry = [plan.window[i] for i in plan.part.unplaced]
        lpt.append(imbalance(plan.part.rank_cost))
        rr.append(imbalance(round_robin_costs([plan.costs[i] for i in placed], R)))
        rr_bytes.append(imbalance(round_robin_costs([float(plan.sizes[i]) for i in placed], R)))
        eff.append(sum(plan.part.rank_bytes) / (R * M * C))
    return {"ranks": R, "micro_batches_per_rank": M, "micro_batch_bytes": C, "steps": steps, "cost_model": cm_name,
            "imbalance_balanced_mean": float(np.mean(lpt)), "imbalance_balanced_max": float(np.max(lpt)),
            "imbalance_round_robin_mean": float(np.mean(rr)), "imbalance_round_robin_max": float(np.max(rr)),
            "imbalance_round_robin_bytes_mean": float(np.mean(rr_bytes)),
            "packing_efficiency_balanced_mean": float(np.mean(eff))}


def main() -> None:
    out = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    with tempfile.TemporaryDirectory() as tmp:
        summary = shard_demo(tmp, WriterOptions(shard_size=256_000, val_fraction=0.0, progress=False))
        index = os.path.join(tmp, "train", "index.json")
        _, shards = load_index(index)
        urls = [s.url for s in shards]
        corpus_bytes = summary.bytes["train"]
        out["corpus"] = {"documents": summary.documents["train"], "bytes": corpus_bytes, "shards": len(urls),
                         "shard_write_s": round(summary.seconds, 3)}
        raw_tarfile_mb_s(urls)  # warm the page cache
        tp = {"raw_tarfile_mb_s": raw_tarfile_mb_s(urls), "shard_parser_mb_s": shard_parser_mb_s(urls)}
        for w in (0, 1, 2):
            r = loader_throughput(index, w)
            tp[f"loader_workers{w}_mb_s"] = r.pop("mb_s")
            tp[f"loader_workers{w}"] = r
        tp["raw_tarfile_mb_s_after"] = raw_tarfile_mb_s(urls)
        raw = (tp["raw_tarfile_mb_s"] + tp["raw_tarfile_mb_s_after"]) / 2
        tp["ratio_workers1_vs_raw"] = tp["loader_workers1_mb_s"] / raw
        tp["ratio_workers2_per_worker_vs_raw"] = tp["loader_workers2_mb_s"] / 2 / raw
        tp["note"] = ("MB/s of real row bytes (BOS + document) delivered as packed MicroBatch tensors, "
                      f"{EPOCHS} passes over the demo corpus, 65536-byte micro-batches, from the first step on; "
                      "startup_s is the time to the first step (worker start included)")
        out["throughput"] = tp
        out["packing_efficiency"] = [packing_efficiency(index, C, corpus_bytes) for C in (8192, 65536)]
        out["balance_8_ranks"] = simulated_ranks(index)
    os.makedirs(os.path.join(ROOT, "bench-results"), exist_ok=True)
    path = os.path.join(ROOT, "bench-results", "data_pipeline.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
