#!/usr/bin/env bash
# The one prepared GPU check (under 8 minutes on an H100/H200). Prints one JSON of figures and
# writes it to $OUT/gpu_check.json (OUT defaults to /tmp/gpu_check), beside the run directories.
#   1. scripts/gpu_check.py: fused kernels vs the pure-PyTorch path (SSD scan, whole model),
#      varlen attention (torch's varlen_attn, flash-attn where installed) vs sdpa_packed, host
#      syncs per micro-batch under CUDA's sync debug mode, and training-step throughput and MFU of
#      the small, 1-stage L and 2-stage L configs beside FLOP-matched isotropic Transformers.
#   2. the trainer's GPU path (device placement, bf16 autocast under ZeRO-3, NCCL, perf/mfu): the
#      small config on 1 GPU, 30 steps with a checkpoint at 15, killed after step 18 and resumed;
#      the losses after the resume must equal the uninterrupted run's within bf16 noise.
# Where deepspeed, webdataset or mamba-ssm are not installed, `bash scripts/gpu_wheels.sh` here
# fills .whl/ and the device run carries it: this script installs it into /tmp/site and loads
# mamba-ssm's Triton kernels from .whl/mamba_src without its compiled extension. Without MLflow
# the runs train with tracking off; the figures come from train_log.jsonl and summary.json.
# On CPU (DEVICE=cpu CONFIG=pretrain/configs/tiny.yaml PRECISION=fp32) it checks itself.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-pretrain/configs/small.yaml}
PRECISION=${PRECISION:-bf16}
STEPS=30 KILL_AT=18
mkdir -p "$OUT"
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
t0=$(date +%s)
export PYTHONUNBUFFERED=1  # the logs are read while the runs go on, and a killed run keeps what it printed
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl failed"; exit 5; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ -z "${MAMBA_SRC:-}" ] && [ -d .whl/mamba_src/mamba_ssm ] && MAMBA_SRC=.whl/mamba_src/mamba_ssm
nvidia-smi -L 2>/dev/null || true
"$PY" scripts/gpu_check.py --device "$DEVICE" --out "$OUT/kernels.json" ${MAMBA_SRC:+--mamba-src "$MAMBA_SRC"} \
    --throughput-budget-s "${THROUGHPUT_BUDGET_S:-150}" > "$OUT/kernels.log" 2>&1
kernels_rc=$?
echo "kernel and throughput checks: exit $kernels_rc ($(( $(date +%s) - t0 )) s)"; tail -3 "$OUT/kernels.log"
"$PY" -c "import torch, deepspeed, webdataset; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__)" \
    || { echo "missing packages for the trainer check (bash scripts/gpu_wheels.sh, then carry .whl)"; exit $(( kernels_rc ? kernels_rc : 3 )); }
tracking=true
"$PY" -c "import mlflow" 2>/dev/null || tracking=false
if [ "$DEVICE" = cpu ]; then export DS_ACCELERATOR=cpu; else unset DS_ACCELERATOR; fi
"$PY" -m data_pipeline.shard --demo "$OUT/data" --demo-bytes 2MB >/dev/null || exit 4
common=(--config "$CONFIG" "data.train_index=[$OUT/data/train/index.json]" "data.eval_index=[$OUT/data/val/index.json]"
        train.steps=$STEPS train.precision=$PRECISION checkpoint.every=15 train.log_every=5 train.eval_every=0
        train.eval_max_steps=4 train.require_fused=false train.deterministic=false tracking.enabled=$tracking
        "tracking.uri=sqlite:///$OUT/mlflow.db")
if [ -n "${MAMBA_SRC:-}" ]; then trainer=("$PY" scripts/gpu_check.py --mamba-src "$MAMBA_SRC" --train)
else trainer=("$PY" -m pretrain.train); fi
filter() { grep -v -e FutureWarning -e 'return func' -e '^  ' | grep -e '^\[train\] [a-z]' -e Error -e error | grep -v 'resolved config'; }
timeout 240 "${trainer[@]}" "${common[@]}" run_dir="$OUT/straight" > "$OUT/straight.log" 2>&1
echo "uninterrupted run: exit $? ($(( $(date +%s) - t0 )) s)"; filter < "$OUT/straight.log" | tail -4
# The trainer itself in the background, killed by its own pid: under `timeout`, kill -9 would end
# `timeout` and leave the trainer running, holding the run directory's lease.
"${trainer[@]}" "${common[@]}" run_dir="$OUT/resumed" debug.hang_at_step=$KILL_AT > "$OUT/killed.log" 2>&1 &
pid=$!
for _ in $(seq 240); do grep -q "hanging after step $KILL_AT" "$OUT/killed.log" 2>/dev/null && break; sleep 1; done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
timeout 240 "${trainer[@]}" "${common[@]}" run_dir="$OUT/resumed" > "$OUT/resumed.log" 2>&1
echo "resumed run: exit $? ($(( $(date +%s) - t0 )) s)"; filter < "$OUT/resumed.log" | tail -4
"$PY" - "$OUT" "$STEPS" "$kernels_rc" <<'PYEOF'
import json, os, statistics, sys
out, steps, kernels_rc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def records(d):
    path = f"{out}/{d}/train_log.jsonl"
    return [r for r in map(json.loads, open(path)) if "loss" in r] if os.path.isfile(path) else []
def summary(d):
    path = f"{out}/{d}/summary.json"
    return json.load(open(path)) if os.path.isfile(path) else {}
a = {r["step"]: r for r in records("straight")}
b = {r["step"]: r for r in records("resumed")}  # the newest record of each step: the resumed attempt's
after = [s for s in range(16, steps + 1) if s in a and s in b]
late = [a[s] for s in range(steps // 2, steps + 1) if s in a]
kernel_lines = sorted({line.strip() for line in open(f"{out}/straight.log") if line.startswith("[train] kernel ")}) \
    if os.path.isfile(f"{out}/straight.log") else []
s_sum = summary("straight")
report = {
    "checks": json.load(open(f"{out}/kernels.json")) if os.path.isfile(f"{out}/kernels.json") else None,
    "checks_exit": kernels_rc,
    "trainer": {
        "kernels": kernel_lines,
        "steps_uninterrupted": len(a), "steps_resumed": len(b), "resumed_from": summary("resumed").get("start_step"),
        "losses_finite": all(r["loss"] == r["loss"] for r in [*a.values(), *b.values()]),
        "max_loss_diff_after_resume": max((abs(a[s]["loss"] - b[s]["loss"]) for s in after), default=None),
        "loss_first_last": [a[min(a)]["loss"], a[max(a)]["loss"]] if a else None,
        "bytes_per_s_median_second_half": statistics.median(r["bytes"] / r["step_time_s"] for r in late) if late else None,
        "mfu_median_second_half": statistics.median(r["mfu"] for r in late) if late and "mfu" in late[0] else None,
        **{k: s_sum.get(k) for k in ("status", "step_time_s", "data_share", "tracking_share", "ckpt_share",
                                     "cuda_peak_mib_per_rank")},
        "communication_share": "not measured: one GPU, no collectives cross a link",
    },
}
open(f"{out}/gpu_check.json", "w").write(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
PYEOF
echo "gpu_check: $(( $(date +%s) - t0 )) s in all; figures in $OUT/gpu_check.json"
exit $kernels_rc
