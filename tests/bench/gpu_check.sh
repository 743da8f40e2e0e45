#!/usr/bin/env bash
# One short check of the trainer's GPU path (device placement, bf16 autocast under ZeRO-3, perf/mfu):
# tiny config, 1 GPU, 20 steps. Writes its run directory under $OUT (or /tmp/gpu_check).
set -u
OUT=${OUT:-/tmp/gpu_check}
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi -L || true
$PY -c "import torch, deepspeed, mlflow, webdataset, torchdata; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__)" || { echo "missing packages"; exit 3; }
unset DS_ACCELERATOR
$PY -m data_pipeline.shard --demo "$OUT/data" --demo-bytes 300KB >/dev/null || exit 4
for prec in bf16 fp32; do
  timeout 200 $PY -m pretrain.train --config pretrain/configs/tiny.yaml "data.train_index=[$OUT/data/train/index.json]" \
    "data.eval_index=[$OUT/data/val/index.json]" run_dir="$OUT/run_$prec" train.steps=20 train.precision=$prec \
    tracking.uri="sqlite:///$OUT/mlflow.db" train.log_every=5 train.deterministic=false 2>&1 \
    | grep -v -e FutureWarning -e 'return func' -e '^  ' | grep -e '^\[train\] [a-z]' -e Error -e error | grep -v 'resolved config'
done
$PY - "$OUT" <<'PYEOF'
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient(f"sqlite:///{sys.argv[1]}/mlflow.db")
for r in c.search_runs([e.experiment_id for e in c.search_experiments()]):
    print(r.info.run_name, {k: round(v, 4) for k, v in r.data.metrics.items() if k.startswith(("perf/", "train/loss", "eval/bpb"))})
PYEOF
