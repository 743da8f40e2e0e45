"""Pipeline benchmark: the hierarchy of the small 1-stage H-Net over 2 pipeline ranks (CPU, gloo).

    .venv/bin/python tests/bench/bench_pipeline.py   (or `make bench`)

Writes bench-results/pipeline.json. Figures:
- per schedule (v, 1f1b, gpipe) and 1, 2, 4, 8, 16 micro-batches per step: step time (median of
  2 steps after a warm-up), the measured bubble of each rank (share of its step spent waiting
  for a neighbour), the schedule's theoretical bubble at unit costs, and the theory of the papers
  for comparison ((p-1)/m for 1F1B; about 2(p-1)/(3m) for a V-order with fused backward);
- bytes sent between the stages per step and per micro-batch, against the bytes the
  un-pipelined model holds for the backward of one micro-batch (autograd's saved tensors, one
  count per storage, parameters left out, counted in one process);
- ZeRO-3 all-gather bytes per rank and step against micro-batches per step, 2 pipeline ranks x
  2 data-parallel ranks, with parallel.keep_params_gathered off and on;
- per-rank cost balance: over 30 training steps (V, 4 micro-batches) each rank's compute time
  (step time minus waiting) as a share, beside the share the FLOP model (pretrain/model/flops.py)
  predicts at that step's compression ratio, and the predicted shares at other ratios the router
  may move to. Elsewhere the schedules are compared with the learning rate at 0 (one model).
On 2 CPU cores the ranks share cores, so absolute times say little; the bubble figures and the
bytes do not depend on it.
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

WORKER = str(REPO / "tests" / "bench" / "pipeline_bench_worker.py")
MICRO_BATCH_BYTES = 2048
TRAIN_STEPS = 30


def launch(world: int, *args: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        run_ranks([PY, WORKER, str(out), "--micro-batch-bytes", str(MICRO_BATCH_BYTES), *args], world, REPO,
                  log_dir=d, timeout=1800)
        return json.loads(out.read_text())


def saved_activation_bytes(config: str) -> float:
    """Bytes autograd keeps for the backward of one micro-batch of the un-pipelined model (what a
    data-parallel rank holds at a time under gradient accumulation): saved tensors, one count per
    storage, parameters left out."""
    import torch

    import equiv_worker
    from pretrain.config import load_config
    from pretrain.model import HNetConfig, HNetForCausalLM

    cfg = load_config(str(REPO / "pretrain" / "configs" / f"{config}.yaml"), [], validate=False)
    model = HNetForCausalLM(HNetConfig.from_dict(cfg.model_dict()))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            storages[st.data_ptr()] = st.nbytes()
        return t

    mb = equiv_worker.make_micro_batch(torch.Generator().manual_seed(0), [512] * (MICRO_BATCH_BYTES // 512), "m")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(mb.input_ids, cu_seqlens=mb.cu_seqlens, labels=mb.labels).loss_sum
    del loss
    return float(sum(storages.values()))


def predicted_shares(config: str, ratios: list[float]) -> dict[str, list[float]]:
    from parallel.pipeline import split_levels
    from pretrain.config import load_config
    from pretrain.model import HNetConfig
    from pretrain.model.flops import level_flops_per_byte

    cfg = load_config(str(REPO / "pretrain" / "configs" / f"{config}.yaml"), [], validate=False)
    model_cfg = HNetConfig.from_dict(cfg.model_dict())
    levels = split_levels(model_cfg, 2)
    out = {}
    for r in ratios:
        cost = level_flops_per_byte(model_cfg, [r] * model_cfg.num_stages, doc_bytes=512)
        per_rank = [sum(cost[i] for i in lv) for lv in levels]
        out[f"ratio {r:g}"] = [c / sum(per_rank) for c in per_rank]
    return out


def balance_over_training(config: str, rows: list[dict]) -> list[dict]:
    """Per training step: the measured compute share of each rank beside the FLOP model's at
    the compression ratio of that step."""
    from parallel.pipeline import split_levels
    from pretrain.config import load_config
    from pretrain.model import HNetConfig
    from pretrain.model.flops import level_flops_per_byte, stage_compression

    cfg = load_config(str(REPO / "pretrain" / "configs" / f"{config}.yaml"), [], validate=False)
    model_cfg = HNetConfig.from_dict(cfg.model_dict())
    levels = split_levels(model_cfg, 2)
    out = []
    for row in rows:
        cost = level_flops_per_byte(model_cfg, stage_compression(row["compression"]), doc_bytes=512)
        per_rank = [sum(cost[i] for i in lv) for lv in levels]
        busy = row["compute_s_per_rank"]
        out.append({"step": row["step"], "loss": row["loss"], "bytes_per_chunk": row["compression"],
                    "measured_share": [b / sum(busy) for b in busy],
                    "predicted_share": [c / sum(per_rank) for c in per_rank]})
    return out


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    saved = saved_activation_bytes("small")
    schedules = launch(2, "--pp", "2", "--train-steps", str(TRAIN_STEPS))
    for row in schedules["results"]:
        m = row["micro_batches"]
        row["bubble_paper_1f1b"] = (2 - 1) / (m + 2 - 1)  # share of the step: (p-1)/(m+p-1)
        row["bubble_paper_v_fused"] = 2 * (2 - 1) / (3 * m) / (1 + 2 * (2 - 1) / (3 * m))
        row["pipeline_bytes_sent_per_micro_batch"] = row["pipeline_bytes_sent"] / m
        row["saved_activation_bytes_per_micro_batch_unpipelined"] = saved
        busy = row["compute_s_per_rank"]
        row["compute_share_per_rank"] = [b / sum(busy) for b in busy]
    gathers = {}
    for keep in (False, True):
        flag = ["--keep-gathered"] if keep else []
        res = launch(4, "--pp", "2", "--schedules", "v", "--micro-batches", "1,2,4,8", *flag)
        gathers["kept" if keep else "re-gathered"] = [
            {"micro_batches": r["micro_batches"], "all_gather_bytes_per_rank": r["all_gather_bytes_per_rank"],
             "step_s": r["step_s"]} for r in res["results"]]
    report = {"model": "small", "micro_batch_bytes": MICRO_BATCH_BYTES, "schedules": schedules["results"],
              "zero3_all_gather": gathers,
              "predicted_compute_share": predicted_shares("small", [2.0, 4.0, 6.0, 8.0]),
              "balance_over_training": balance_over_training("small", schedules["training"])}
    os.makedirs(REPO / "bench-results", exist_ok=True)
    (REPO / "bench-results" / "pipeline.json").write_text(json.dumps(report, indent=1))
    for row in schedules["results"]:
        print(f"{row['schedule']:>5} m={row['micro_batches']:>2}: step {row['step_s']:.3f} s, bubble measured "
              f"{[round(b, 3) for b in row['bubble_measured']]}, theory {row['bubble_theory']:.3f}, "
              f"sent {row['pipeline_bytes_sent_per_micro_batch'] / 1e6:.2f} MB/micro-batch vs saved "
              f"{row['saved_activation_bytes_per_micro_batch_unpipelined'] / 1e6:.1f} MB, "
              f"compute share {[round(s, 3) for s in row['compute_share_per_rank']]}")
    for k, rows in gathers.items():
        print(f"all-gather bytes per rank and step, params {k}: "
              + ", ".join(f"m={r['micro_batches']}: {r['all_gather_bytes_per_rank']} " for r in rows))
    print("predicted compute share per rank:", report["predicted_compute_share"])
    for row in report["balance_over_training"][::5]:
        print(f"train step {row['step']}: bytes/chunk {[round(c, 2) for c in row['bytes_per_chunk']]}, compute share "
              f"measured {[round(x, 3) for x in row['measured_share']]} predicted "
              f"{[round(x, 3) for x in row['predicted_share']]}")


if __name__ == "__main__":
    main()
