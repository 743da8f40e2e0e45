#!/usr/bin/env bash
# The one prepared GPU check (under 8 minutes on an H100/H200):
#   1. scripts/gpu_check.py: fused kernels vs the pure-PyTorch path (SSD scan, whole model) and
#      bf16 throughput. Needs only torch (+ triton, einops); MAMBA_SRC may point at an unpacked
#      mamba_ssm source tree whose Triton SSD kernels it loads without the compiled extension.
#   2. the trainer's GPU path (device placement, bf16 autocast under ZeRO-3, perf/mfu): tiny
#      config, 1 GPU, 20 steps; needs deepspeed, mlflow, webdataset and torchdata (carry them as
#      wheels where they are not installed).
# Writes gpu_check.json and the run directories under $OUT (or /tmp/gpu_check).
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi -L || true
$PY scripts/gpu_check.py --out "$OUT/gpu_check.json" ${MAMBA_SRC:+--mamba-src "$MAMBA_SRC"}
kernels_rc=$?
echo "kernel checks: exit $kernels_rc"
$PY -c "import torch, deepspeed, mlflow, webdataset, torchdata; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__)" || { echo "missing packages for the trainer check"; exit $(( kernels_rc ? kernels_rc : 3 )); }
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
