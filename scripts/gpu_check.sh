#!/usr/bin/env bash
# The one prepared GPU check (under 8 minutes on an H100/H200). Prints one JSON of figures and
# writes it to $OUT/gpu_check.json (OUT defaults to /tmp/gpu_check). $OUT gets only the JSON files
# and the logs (a device run brings back a few small files); the shards, run directories and
# checkpoints go to $WORK (default /tmp/gpu_check_work).
#   1. scripts/gpu_check.py: fused kernels vs the pure-PyTorch path (SSD scan, causal conv where
#      causal-conv1d is installed, the norms' F.rms_norm and whether CUDA ran its fused kernel,
#      whole model), varlen attention (torch's varlen_attn, flash-attn
#      where installed) vs sdpa_packed, host syncs per micro-batch under CUDA's sync debug mode,
#      and training-step throughput and MFU of the 1-stage L and 2-stage L configs (first) and the
#      small one, each beside a FLOP-matched isotropic Transformer.
#   2. the trainer's GPU path (device placement, bf16 autocast under ZeRO-3, NCCL, perf/mfu): the
#      small config on 1 GPU, 30 steps with a checkpoint at 15, killed after step 18 and resumed
#      (mamba_ssm's kernels in their smallest tiles, untuned: its bytes/s is not a tuned figure);
#      the losses after the resume must equal the uninterrupted run's within RESUME_TOL (relative;
#      default 2e-2 in bf16: the fused backward's atomics and autotuning are not bitwise
#      reproducible; 1e-5 in fp32 on CPU, where resume is exact).
#   3. generation: pretrain.sample from the resumed run's last checkpoint, two prompts, 64 bytes.
#   4. the pipeline (where there are two GPUs, and on CPU): the config over 2 pipeline ranks, 10
#      steps and the final evaluation, under NCCL on GPUs (the tests run it over gloo only).
# Exit status: 0 when every equivalence check, both trainer runs, the resume comparison, the
# sampling and (where it runs) the pipeline pass.
# Each part is bounded (the kernel checks by KERNELS_TIMEOUT_S, 280 s; each of the three trainer
# launches by TRAIN_TIMEOUT_S, 75 s; the sampling by SAMPLE_TIMEOUT_S, 45 s: under 570 s in all, the
# first run on an H200 took 404 s; with two GPUs or more also the pipeline, by PIPE_TIMEOUT_S, 120 s,
# run only while that much of TOTAL_BUDGET_S, 570 s, is left) and gpu_check.py writes its JSON after
# every part, so a part that fails or hangs costs only itself.
# Where deepspeed, webdataset or mamba-ssm are not installed, `bash scripts/gpu_wheels.sh` here
# fills .whl/ and the device run carries it: this script installs it into /tmp/site and loads
# mamba-ssm's Triton kernels from .whl/mamba_src without its compiled extension. Without MLflow
# the runs train with tracking off; the figures come from train_log.jsonl and summary.json.
# On CPU (DEVICE=cpu CONFIG=pretrain/configs/tiny.yaml PRECISION=fp32) it checks itself.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
WORK=${WORK:-/tmp/gpu_check_work}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-pretrain/configs/small.yaml}
PRECISION=${PRECISION:-bf16}
if [ "$PRECISION" = bf16 ]; then RESUME_TOL=${RESUME_TOL:-2e-2}; else RESUME_TOL=${RESUME_TOL:-1e-5}; fi
# train.deterministic for both trainer runs: off by default, as a GPU user trains (the drift of two
# runs before the kill is then a measurement). On CPU with more than one thread even the pure path
# is not bitwise reproducible without it: the backward of a gather x[idx] (index_put_ accumulating)
# adds with parallel atomics unless torch.use_deterministic_algorithms is on.
DETERMINISTIC=${DETERMINISTIC:-false}
STEPS=30 KILL_AT=18
TRAIN_TIMEOUT_S=${TRAIN_TIMEOUT_S:-75}
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
# Triton: autotuning results cached across the processes below (each would tune ~200 configs per
# kernel anew); fp32 dot products in IEEE fp32 for the fp32 comparisons (Triton's default is TF32
# on NVIDIA parts, which the pure path's fp32 matmuls are not; bf16 is unaffected)
export TRITON_CACHE_AUTOTUNING=1
PY=${PY:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
t0=$(date +%s)
export PYTHONUNBUFFERED=1  # the logs are read while the runs go on, and a killed run keeps what it printed
# the carried wheels are for the GPU machine's Python (3.12): not installed in the CPU self-check
if [ "$DEVICE" != cpu ] && [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl failed"; exit 5; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
[ "$DEVICE" != cpu ] && [ -z "${MAMBA_SRC:-}" ] && [ -d .whl/mamba_src/mamba_ssm ] && MAMBA_SRC=.whl/mamba_src/mamba_ssm
nvidia-smi -L 2>/dev/null || true
TRITON_F32_DEFAULT=ieee timeout "${KERNELS_TIMEOUT_S:-280}" "$PY" scripts/gpu_check.py --device "$DEVICE" \
    --out "$OUT/kernels.json" ${MAMBA_SRC:+--mamba-src "$MAMBA_SRC"} \
    --throughput-budget-s "${THROUGHPUT_BUDGET_S:-160}" > "$OUT/kernels.log" 2>&1
kernels_rc=$?
echo "kernel and throughput checks: exit $kernels_rc ($(( $(date +%s) - t0 )) s)"; tail -3 "$OUT/kernels.log"
"$PY" -c "import torch, deepspeed, webdataset; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'deepspeed', deepspeed.__version__)" \
    || { echo "missing packages for the trainer check (bash scripts/gpu_wheels.sh, then carry .whl)"; exit $(( kernels_rc ? kernels_rc : 3 )); }
tracking=true
"$PY" -c "import mlflow" 2>/dev/null || tracking=false
if [ "$DEVICE" = cpu ]; then export DS_ACCELERATOR=cpu; else unset DS_ACCELERATOR; fi
"$PY" -m data_pipeline.shard --demo "$WORK/data" --demo-bytes 2MB >/dev/null || exit 4
common=(--config "$CONFIG" "data.train_index=[$WORK/data/train/index.json]" "data.eval_index=[$WORK/data/val/index.json]"
        train.steps=$STEPS train.precision=$PRECISION checkpoint.every=15 train.log_every=5 train.eval_every=0
        train.eval_max_steps=4 train.require_fused=false train.deterministic=$DETERMINISTIC tracking.enabled=$tracking
        "tracking.uri=sqlite:///$WORK/mlflow.db")
# The trainer through gpu_check.py --run: mamba_ssm's Triton kernels from $MAMBA_SRC where set, and
# each autotuned kernel compiled once, in its smallest tiles (autotuning all of them would take
# most of a launch's time; the throughput rows above are the tuned figures)
with_kernels=("$PY" scripts/gpu_check.py ${MAMBA_SRC:+--mamba-src "$MAMBA_SRC"} --smallest-tiles --run)
trainer=("${with_kernels[@]}" pretrain.train)
filter() { grep -v -e FutureWarning -e 'return func' -e '^  ' | grep -e '^\[train\] [a-z]' -e Error -e error | grep -v 'resolved config'; }
timeout "$TRAIN_TIMEOUT_S" "${trainer[@]}" "${common[@]}" run_dir="$WORK/straight" > "$OUT/straight.log" 2>&1
straight_rc=$?
echo "uninterrupted run: exit $straight_rc ($(( $(date +%s) - t0 )) s)"; filter < "$OUT/straight.log" | tail -4
# The trainer itself in the background, killed by its own pid: under `timeout`, kill -9 would end
# `timeout` and leave the trainer running, holding the run directory's lease.
"${trainer[@]}" "${common[@]}" run_dir="$WORK/resumed" debug.hang_at_step=$KILL_AT > "$OUT/killed.log" 2>&1 &
pid=$!
for _ in $(seq "$TRAIN_TIMEOUT_S"); do grep -q "hanging after step $KILL_AT" "$OUT/killed.log" 2>/dev/null && break; sleep 1; done
kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null
timeout "$TRAIN_TIMEOUT_S" "${trainer[@]}" "${common[@]}" run_dir="$WORK/resumed" > "$OUT/resumed.log" 2>&1
resumed_rc=$?
echo "resumed run: exit $resumed_rc ($(( $(date +%s) - t0 )) s)"; filter < "$OUT/resumed.log" | tail -4
# Generation from the resumed run's last checkpoint (consolidated from its ZeRO-3 shards), as a
# user samples a trained run: the prompts' forward pass, then decoding byte by byte
timeout "${SAMPLE_TIMEOUT_S:-45}" "${with_kernels[@]}" pretrain.sample "$WORK/resumed" --prompt "The " "def f(" \
    --max-bytes 64 --device "$DEVICE" --dtype "$PRECISION" --jsonl "$WORK/sample.jsonl" > "$OUT/sample.log" 2>&1
sample_rc=$?
echo "sampling: exit $sample_rc"; grep -e '^\[sample\]' -e Error "$OUT/sample.log" | tail -2
# The pipeline over two ranks (one per GPU; NCCL takes no two ranks on one GPU), where there are
# two GPUs or on CPU over gloo: 10 steps of the config split over 2 pipeline stages, with the final
# evaluation, both ranks started here and ended by their pids if they outlive PIPE_TIMEOUT_S.
# the GPUs this process can use (nvidia-smi lists the node's, whatever CUDA_VISIBLE_DEVICES says)
ngpu=0
[ "$DEVICE" != cpu ] && ngpu=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null | tail -1)
case $ngpu in ''|*[!0-9]*) ngpu=0 ;; esac
pipe_timeout=${PIPE_TIMEOUT_S:-120}
pipe_rc=skipped pipe_codes=""
left=$(( ${TOTAL_BUDGET_S:-570} - ($(date +%s) - t0) ))
if [ "$DEVICE" != cpu ] && [ "$ngpu" -lt 2 ]; then
    pipe_why="$ngpu GPU(s) visible: a pipeline of 2 ranks needs a GPU per rank"
elif [ "$left" -lt "$pipe_timeout" ]; then
    pipe_why="not run: $left s left of the ${TOTAL_BUDGET_S:-570} s budget, the pipeline may take $pipe_timeout s"
else
    port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    pids=()
    for r in 0 1; do
        RANK=$r WORLD_SIZE=2 LOCAL_RANK=$r MASTER_ADDR=127.0.0.1 MASTER_PORT=$port "${trainer[@]}" "${common[@]}" \
            train.steps=10 checkpoint.every=0 parallel.pipeline_stages=2 run_dir="$WORK/pipeline" \
            > "$OUT/pipeline$r.log" 2>&1 &
        pids+=($!)
    done
    # each rank's exit status as it ends; a rank that fails ends the wait (its peer would wait for
    # it in a collective until the timeout), and the ranks still running then are ended by pid
    codes=(running running)
    for _ in $(seq "$pipe_timeout"); do
        failed=0 running=0
        for i in 0 1; do
            if [ "${codes[$i]}" = running ] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
                wait "${pids[$i]}"; codes[$i]=$?
            fi
            [ "${codes[$i]}" = running ] && running=1
            [ "${codes[$i]}" != running ] && [ "${codes[$i]}" != 0 ] && failed=1
        done
        [ $running = 0 ] || [ $failed = 1 ] && break
        sleep 1
    done
    for i in 0 1; do
        if [ "${codes[$i]}" = running ]; then kill -9 "${pids[$i]}" 2>/dev/null; wait "${pids[$i]}" 2>/dev/null; codes[$i]=killed; fi
    done
    pipe_codes="${codes[0]},${codes[1]}"
    # the first real failure, else 124 for ranks ended here, else 0
    pipe_rc=0
    for c in "${codes[@]}"; do if [ "$c" != killed ] && [ "$c" != 0 ]; then pipe_rc=$c; break; fi; done
    if [ "$pipe_rc" = 0 ] && [[ $pipe_codes == *killed* ]]; then pipe_rc=124; fi
    echo "pipeline over 2 ranks: exit $pipe_rc (ranks $pipe_codes; $(( $(date +%s) - t0 )) s)"
    filter < "$OUT/pipeline0.log" | tail -2
fi
"$PY" - "$OUT" "$WORK" "$STEPS" "$kernels_rc" "$straight_rc" "$resumed_rc" "$RESUME_TOL" "$sample_rc" "$pipe_rc" \
    "$pipe_codes" "${pipe_why:-}" <<'PYEOF'
import glob, json, os, statistics, sys
out, work = sys.argv[1], sys.argv[2]
steps, kernels_rc, straight_rc, resumed_rc = map(int, sys.argv[3:7])
tol = float(sys.argv[7])
sample_rc = int(sys.argv[8])
pipe_rc, pipe_codes, pipe_why = sys.argv[9], sys.argv[10], sys.argv[11]
def records(d):
    path = f"{work}/{d}/train_log.jsonl"
    return [r for r in map(json.loads, open(path)) if "loss" in r] if os.path.isfile(path) else []
def summary(d):
    path = f"{work}/{d}/summary.json"
    return json.load(open(path)) if os.path.isfile(path) else {}
a = {r["step"]: r for r in records("straight")}
b = {r["step"]: r for r in records("resumed")}  # the newest record of each step: the resumed attempt's
after = [s for s in range(16, steps + 1) if s in a and s in b]
late = [a[s] for s in range(steps // 2, steps + 1) if s in a]
log = open(f"{out}/straight.log").read().splitlines() if os.path.isfile(f"{out}/straight.log") else []
kernel_lines = sorted({line.strip() for line in log if line.startswith("[train] kernel ")})
autotuning = next((line.strip() for line in log if line.startswith("[gpu_check] autotuning")), "full")
s_sum = summary("straight")
finite = all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in [*a.values(), *b.values()])
def max_rel_diff(steps):
    return max((abs(a[s]["loss"] - b[s]["loss"]) / max(abs(a[s]["loss"]), 1e-12) for s in steps), default=None)
rel_diff = max_rel_diff(after)
# the same seed and data, before any kill: how far two runs drift apart on this device anyway (the
# fused backward's atomics are not bitwise reproducible); the resume is judged against RESUME_TOL
before = [s for s in range(1, 16) if s in a and s in b]
trainer_ok = (straight_rc == 0 and resumed_rc == 0 and len(a) == steps and finite and rel_diff is not None
              and rel_diff <= tol and summary("resumed").get("status") == "completed")
report = {
    "checks": json.load(open(f"{out}/kernels.json")) if os.path.isfile(f"{out}/kernels.json") else None,
    "checks_exit": kernels_rc,
    "trainer": {
        "kernels": kernel_lines, "autotuning": autotuning,
        "steps_uninterrupted": len(a), "steps_resumed": len(b), "resumed_from": summary("resumed").get("start_step"),
        "exit_codes": {"uninterrupted": straight_rc, "resumed": resumed_rc},
        "losses_finite": finite,
        "max_loss_diff_after_resume": max((abs(a[s]["loss"] - b[s]["loss"]) for s in after), default=None),
        "max_rel_loss_diff_after_resume": rel_diff, "resume_tolerance_rel": tol, "ok": trainer_ok,
        "max_rel_loss_diff_before_the_kill": max_rel_diff(before),
        "loss_first_last": [a[min(a)]["loss"], a[max(a)]["loss"]] if a else None,
        "bytes_per_s_median_second_half": statistics.median(r["bytes"] / r["step_time_s"] for r in late) if late else None,
        "mfu_median_second_half": statistics.median(r["mfu"] for r in late) if late and "mfu" in late[0] else None,
        **{k: s_sum.get(k) for k in ("status", "step_time_s", "data_share", "tracking_share", "ckpt_share",
                                     "cuda_peak_mib_per_rank")},
        "communication_share": "not measured: one GPU, no collectives cross a link",
    },
    "sample": {"exit_code": sample_rc,
               "bytes_generated": [json.loads(line)["n_bytes"] for line in open(f"{work}/sample.jsonl")]
               if os.path.isfile(f"{work}/sample.jsonl") else None,
               "stats": next((line.strip() for line in open(f"{out}/sample.log") if line.startswith("[sample] ")), None)
               if os.path.isfile(f"{out}/sample.log") else None},
}
if pipe_rc == "skipped":
    report["pipeline"] = {"skipped": pipe_why, "ok": True}
else:
    p = records("pipeline")
    report["pipeline"] = {
        "exit_code": int(pipe_rc), "rank_exit": pipe_codes.split(","), "steps": len({r["step"] for r in p}),
        "losses_finite": all(r["loss"] == r["loss"] and abs(r["loss"]) != float("inf") for r in p),
        "loss_first_last": [p[0]["loss"], p[-1]["loss"]] if p else None,
        # each stage saves its own shards (pipe{k}): the run was split, not data-parallel
        "stage_checkpoints": sorted({os.path.basename(d) for d in glob.glob(f"{work}/pipeline/**/pipe[0-9]*",
                                                                             recursive=True)}),
        "status": summary("pipeline").get("status"),
    }
    report["pipeline"]["ok"] = (int(pipe_rc) == 0 and report["pipeline"]["steps"] == 10
                                and report["pipeline"]["losses_finite"] and report["pipeline"]["status"] == "completed"
                                and report["pipeline"]["stage_checkpoints"] == ["pipe0", "pipe1"])
open(f"{out}/gpu_check.json", "w").write(json.dumps(report, indent=1))
print(json.dumps(report, indent=1))
sys.exit(0 if trainer_ok and sample_rc == 0 and report["pipeline"]["ok"] else 6)
PYEOF
trainer_rc=$?
echo "gpu_check: $(( $(date +%s) - t0 )) s in all; figures in $OUT/gpu_check.json"
[ "$kernels_rc" -ne 0 ] && exit "$kernels_rc"
exit $trainer_rc
