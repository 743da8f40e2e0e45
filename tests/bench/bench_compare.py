"""`pretrain.compare` on a synthetic store: 100 runs x 10,000 steps x 20 metrics in SQLite.

    .venv/bin/python tests/bench/bench_compare.py   (or `make bench`)

The store is made with MLflow's own schema (experiment and runs through the client, the 20 M
metric rows inserted in bulk with sqlite3, as the client would write them, restart tags on a
tenth of the runs); then the timed command is the CLI a user runs:
`python -m pretrain.compare --experiment synthetic --metrics <4 metrics> --out DIR`, reading every
point of the plotted and tabled metrics, cleaning restarts, writing table, 4 PNGs and the HTML.
Writes bench-results/compare.json.
"""
from __future__ import annotations

import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RUNS, STEPS, METRICS = 100, 10_000, 20
PLOTTED = ["train/loss", "eval/bpb", "train/compression/stage0", "perf/bytes_per_s"]


def metric_names() -> list[str]:
    base = ["train/loss", "train/bpb", "train/ratio_loss", "train/compression/stage0", "train/boundary_fraction/stage0",
            "train/lr", "train/grad_norm", "perf/bytes_per_s", "perf/step_time_s", "data/packing_efficiency",
            "data/imbalance", "eval/bpb", "eval/compression/stage0", "train/bytes_seen"]
    return base + [f"extra/m{i}" for i in range(METRICS - len(base))]


def make_store(db: Path) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exp = client.create_experiment("synthetic")
    ids = []
    for i in range(RUNS):
        tags = {"restart_count": "0"}
        if i % 10 == 0:  # killed after logging step 5100, resumed from its step-5000 checkpoint
            tags = {"restart_count": "1", "restart_1.from_step": "5000", "restart_1.started_ms": str(10 ** 12 + 5001 * 1000 - 500)}
        run = client.create_run(exp, run_name=f"r{i}", tags=tags, start_time=10 ** 12)
        client.log_param(run.info.run_id, "config.train.seed", str(i % 5))
        client.log_param(run.info.run_id, "config.optim.lr", str(1e-3 * (1 + i // 5)))
        ids.append(run.info.run_id)
    con = sqlite3.connect(db)
    # Bulk loading only (the timed reads open the file normally): no journal, no fsync, and rows
    # in the order of the metrics table's primary key (key, timestamp, ...), so the B-tree grows
    # at its end instead of splitting pages all over a 5 GB file.
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA cache_size=-1000000")
    names = metric_names()
    for k, name in sorted(enumerate(names), key=lambda kn: kn[1]):
        rng = random.Random(k)
        rows = []
        for i, rid in enumerate(ids):
            if i % 10 == 0:  # the abandoned attempt's points, logged before the restart began
                rows += [(name, 9.0, 10 ** 12 + 100 + step * 1000 - 200_000, rid, step, 0) for step in range(5001, 5101)]
            rows += [(name, 5.0 / (1 + step / 1000) + rng.random() * 0.01 + k, 10 ** 12 + step * 1000, rid, step, 0)
                     for step in range(1, STEPS + 1)]
        rows.sort(key=lambda r: (r[2], r[4], r[3]))
        con.executemany("INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES (?,?,?,?,?,?)",
                        rows)
        con.commit()
    con.close()


def main() -> None:
    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "mlflow.db"
        t0 = time.perf_counter()
        make_store(db)
        build_s = time.perf_counter() - t0
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        t0 = time.perf_counter()
        res = subprocess.run([sys.executable, "-m", "pretrain.compare", "--tracking-uri", f"sqlite:///{db}",
                              "--experiment", "synthetic", "--metrics", *PLOTTED, "--smooth", "0.9",
                              "--out", str(Path(d) / "out")], env=env, capture_output=True, text=True, timeout=1200)
        compare_s = time.perf_counter() - t0
        assert res.returncode == 0, res.stderr[-3000:]
        size_mb = db.stat().st_size / 1e6
    report = {"runs": RUNS, "steps": STEPS, "metrics_in_store": METRICS, "metrics_read": len(PLOTTED) + 1,
              "store_mb": round(size_mb), "store_build_s": round(build_s, 1), "compare_s": round(compare_s, 1)}
    os.makedirs(REPO / "bench-results", exist_ok=True)
    (REPO / "bench-results" / "compare.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
