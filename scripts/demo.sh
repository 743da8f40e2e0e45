#!/usr/bin/env bash
# `make demo`: demo shards from the embedded corpus -> a tiny 1-stage H-Net trained on 2 CPU
# processes with ZeRO-3 (torchrun, gloo) -> evaluation -> where to look at the run in MLflow.
# About 8 minutes on 2 cores (500 steps of about 0.9 s). Environment variables: DEMO_STEPS (default from demo.yaml), DEMO_NPROC (2).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$PWD/.cache/torch_extensions}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
NPROC=${DEMO_NPROC:-2}
RUN_DIR=runs/demo-$(date +%Y%m%d-%H%M%S)
DB="$PWD/mlflow.db"
EXTRA=()
[ -n "${DEMO_STEPS:-}" ] && EXTRA+=("train.steps=$DEMO_STEPS")

echo "== 1/3 demo shards (embedded corpus: Python stdlib sources) -> demo-data/"
if [ ! -f demo-data/train/index.json ] || [ ! -f demo-data/val/index.json ]; then
  # 96 KB shards: the ~200 KB held-out split then has a shard for each of the 2 ranks
  $PY -m data_pipeline.shard --demo demo-data --shard-size 96KB
else
  echo "demo-data/ already written"
fi

echo "== 2/3 training on $NPROC CPU processes, DeepSpeed ZeRO-3 over gloo -> $RUN_DIR"
$PY -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m pretrain.train \
  --config pretrain/configs/demo.yaml run_dir="$RUN_DIR" tracking.uri="sqlite:///$DB" "${EXTRA[@]}" 2>&1 \
  | grep --line-buffered -v -e 'FutureWarning' -e 'return func(' -e 'apply_to_tensors_only'

echo "== 3/3 results"
$PY - "$RUN_DIR" "$DB" <<'PYEOF'
import json, sys, yaml
run_dir, db = sys.argv[1], sys.argv[2]
recs = [json.loads(l) for l in open(f"{run_dir}/train_log.jsonl")]
train = [r for r in recs if "loss" in r]
evals = [r for r in recs if "eval/bpb" in r]
cfg = yaml.safe_load(open(f"{run_dir}/config.yaml"))
target = cfg["model"]["ratio_targets"]
s = json.load(open(f"{run_dir}/summary.json"))
head = sum(r["bpb"] for r in train[:10]) / min(10, len(train))
tail = sum(r["bpb"] for r in train[-10:]) / min(10, len(train))
comp0 = sum(r["compression"][0] for r in train[:10]) / min(10, len(train))
comp1 = sum(r["compression"][0] for r in train[-10:]) / min(10, len(train))
print(f"train bits per byte: {head:.3f} (first 10 steps) -> {tail:.3f} (last 10 steps)")
print(f"bytes per chunk (stage 0): {comp0:.2f} -> {comp1:.2f}, target {target[0]}")
for e in evals:
    print(f"eval step {e['step']}: bpb {e['eval/bpb']:.3f}, bytes per chunk {e['eval/compression/stage0']:.2f}")
print(f"step time {s['step_time_s']:.3f} s; data loading {s['data_share']:.2%}, "
      f"MLflow tracking {s['tracking_share']:.2%} of step time (+{s['tracking_setup_s']:.1f} s one-off setup), "
      f"checkpoints {s['ckpt_share']:.2%} of wall time")
print(f"\nMLflow database: {db} (run {s['mlflow_run_id']})")
print(f"look at it with:  .venv/bin/mlflow ui --backend-store-uri sqlite:///{db}   (then open http://127.0.0.1:5000)")
print(f"export the model: .venv/bin/python -m pretrain.export {run_dir} {run_dir}/export")
PYEOF
