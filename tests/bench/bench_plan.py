"""The planner's predictions against real engines, and the ZeRO communication table.

    .venv/bin/python tests/bench/bench_plan.py   (or `make bench`)

For ZeRO-1, 2 and 3 (the shipped files), 2 and 4 ranks over gloo and 1, 2 and 4 micro-batches per
rank and step, the small config (2.3M parameters): per rank, the parameter / master / Adam bytes
held (counted from the engine's tensors by tests/parallel/plan_worker.py) and the bytes handed to
each collective in one step (DeepSpeed's comms logger), beside parallel/plan.py's predictions.
Writes bench-results/plan.json; ds_configs/README.md's table comes from it.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "trainer"))

from trainer_harness import PY, run_ranks  # noqa: E402

# A benchmark times what a user's launch costs: every rank a real interpreter (no forkserver).
os.environ.setdefault("HNET_TEST_NO_FORKSERVER", "1")

WORKER = str(REPO / "tests" / "parallel" / "plan_worker.py")


def main() -> None:
    from parallel.plan import comm_bytes, load_model_config, parameter_numels, state_bytes

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    numels = parameter_numels(load_model_config(str(REPO / "pretrain" / "configs" / "small.yaml"))[0])
    rows = []
    for zero in ("zero1", "zero2", "zero3"):
        for world in (2, 4):
            for m in (1, 2, 4):
                with tempfile.TemporaryDirectory() as d:
                    out = Path(d) / "out.json"
                    run_ranks([PY, WORKER, str(out), "--zero", zero, "--micro-batches", str(m)], world, REPO,
                              log_dir=d, timeout=600)
                    got = json.loads(out.read_text())[zero]
                pred_state = state_bytes(numels, zero, world)
                pred_comm = comm_bytes(numels, zero, world, m)
                row = {"zero": zero, "ranks": world, "micro_batches": m,
                       "held_bytes": {k: 4 * v for k, v in got["held"].items()},
                       "predicted_held_bytes": {k: pred_state[k] for k in ("params", "master", "optimizer")},
                       "moved_bytes": got["moved"], "predicted_moved_bytes": pred_comm,
                       "moved_x_param_bytes": sum(got["moved"].values()) / (4 * sum(numels))}
                rows.append(row)
                print(f"{zero} x{world} m={m}: moved {sum(got['moved'].values()) / 1e6:6.2f} MB "
                      f"(predicted {sum(pred_comm.values()) / 1e6:6.2f}), {row['moved_x_param_bytes']:.2f} x the fp32 "
                      f"parameter bytes; held {sum(row['held_bytes'].values()) / 1e6:.2f} MB "
                      f"(predicted {sum(row['predicted_held_bytes'].values()) / 1e6:.2f})", flush=True)
    os.makedirs(REPO / "bench-results", exist_ok=True)
    (REPO / "bench-results" / "plan.json").write_text(json.dumps({"params": sum(numels), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
