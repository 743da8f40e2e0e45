#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with what scripts/gpu_check.sh needs on a GPU machine that has torch,
# triton, numpy, einops, msgpack, ninja, psutil, py-cpuinfo, tqdm and pyyaml but none of this
# project's other packages, and no network:
#   - deepspeed, built here into a pure-Python wheel (PyPI has only its source; its ops compile
#     at run time), with hjson and pydantic (+ pydantic-core for that machine's Python,
#     annotated-types, typing-inspection, typing-extensions);
#   - webdataset and braceexpand;
#   - .whl/mamba_src/: mamba-ssm's sources, whose Triton kernels gpu_check.sh loads without the
#     package's compiled extension (mamba_ssm/__init__.py imports it; nothing else used does).
# MLflow is left out (about 30 MB with its dependencies): without it gpu_check.sh trains with
# tracking off and reads its figures from train_log.jsonl and summary.json.
# The versions are this checkout's (.venv), so the GPU runs what the CPU tests ran.
#
#   bash scripts/gpu_wheels.sh [PYTHON_VERSION]     (default 3.12, the GPU machine's python3)
# then carry .whl with the working tree; gpu_check.sh installs it into /tmp/site.
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
PY=.venv/bin/python
[ -x "$PY" ] || { echo "no .venv: run make setup first" >&2; exit 2; }
W=.whl
rm -rf "$W" && mkdir -p "$W"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }

"$PY" -m pip download -q --no-deps --no-binary=:all: -d "$W/src" "deepspeed==$(version deepspeed)"
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$W" "$W"/src/deepspeed-*.tar.gz
rm -rf "$W/src"

pure=()
for name in hjson pydantic annotated-types typing-inspection typing-extensions webdataset braceexpand; do
    pure+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: -d "$W" "${pure[@]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$W" "pydantic-core==$(version pydantic-core)"

"$PY" scripts/fetch_mamba_src.py "$W/mamba_src" "${MAMBA_VERSION:-}"
ls -1 "$W"
du -sh "$W"
