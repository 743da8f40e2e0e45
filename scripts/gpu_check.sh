#!/usr/bin/env bash
# The one prepared GPU check (under 8 minutes on an H100/H200):
#   1. scripts/gpu_check.py: fused kernels vs the pure-PyTorch path (SSD scan, whole model) and
#      bf16 throughput. Needs only torch (+ triton, einops); MAMBA_SRC may point at an unpacked
#      mamba_ssm source tree whose Triton SSD kernels it loads without the compiled extension.
#   2. the trainer's GPU path (device placement, bf16 autocast under ZeRO-3, NCCL, perf/mfu): the
#      small config, 1 GPU, 30 steps with a checkpoint at 15, killed after it and resumed; the
#      losses after the resume must equal the uninterrupted run's within bf16 noise. Needs
#      deepspeed, mlflow and webdataset (carry them as wheels where they are not installed).
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
$PY -c "import torch, deepspeed, mlflow, webdataset; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__)" || { echo "missing packages for the trainer check"; exit $(( kernels_rc ? kernels_rc : 3 )); }
unset DS_ACCELERATOR
$PY -m data_pipeline.shard --demo "$OUT/data" --demo-bytes 2MB >/dev/null || exit 4
common=(--config pretrain/configs/small.yaml "data.train_index=[$OUT/data/train/index.json]"
        "data.eval_index=[$OUT/data/val/index.json]" train.steps=30 train.precision=bf16 checkpoint.every=15
        tracking.uri="sqlite:///$OUT/mlflow.db" train.log_every=5 train.eval_every=0 train.eval_max_steps=4
        train.require_fused=false train.deterministic=false)
filter() { grep -v -e FutureWarning -e 'return func' -e '^  ' | grep -e '^\[train\] [a-z]' -e Error -e error | grep -v 'resolved config'; }
timeout 240 $PY -m pretrain.train "${common[@]}" run_dir="$OUT/straight" 2>&1 | filter
timeout 240 $PY -m pretrain.train "${common[@]}" run_dir="$OUT/resumed" debug.hang_at_step=18 >"$OUT/killed.log" 2>&1 &
pid=$!
for _ in $(seq 240); do grep -q "hanging after step 18" "$OUT/killed.log" 2>/dev/null && break; sleep 1; done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
timeout 240 $PY -m pretrain.train "${common[@]}" run_dir="$OUT/resumed" 2>&1 | filter
$PY - "$OUT" <<'PYEOF'
import json, sys
from mlflow.tracking import MlflowClient
out = sys.argv[1]
def losses(d):
    return {r["step"]: r["loss"] for r in map(json.loads, open(f"{out}/{d}/train_log.jsonl")) if "loss" in r}
a, b = losses("straight"), losses("resumed")
diff = max(abs(a[s] - b[s]) for s in range(16, 31))
c = MlflowClient(f"sqlite:///{out}/mlflow.db")
runs = {r.info.run_name: {k: round(v, 4) for k, v in r.data.metrics.items() if k.startswith(("perf/", "train/loss", "eval/bpb"))}
        for r in c.search_runs([e.experiment_id for e in c.search_experiments()])}
print(json.dumps({"trainer_resume_max_loss_diff_steps_16_30": diff, "finite": all(map(lambda x: x == x, a.values())),
                  "runs": runs}, indent=1))
PYEOF
