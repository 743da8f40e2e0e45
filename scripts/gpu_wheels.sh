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

# mamba-ssm's sdist cannot even be downloaded by pip here (its metadata build wants CUDA): take
# the file from the package index directly.
MAMBA=${MAMBA_VERSION:-2.3.2.post1}
"$PY" - "$MAMBA" "$W" <<'PYEOF'
import io, os, re, sys, tarfile, urllib.parse, urllib.request
version, out = sys.argv[1], sys.argv[2]
index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
page = urllib.request.urlopen(f"{index}/mamba-ssm/", timeout=60).read().decode()
links = re.findall(r'href="([^"#]*mamba_ssm-' + re.escape(version) + r'\.tar\.gz)', page)
if not links:
    sys.exit(f"no mamba_ssm-{version}.tar.gz in {index}/mamba-ssm/")
url = urllib.parse.urljoin(f"{index}/mamba-ssm/", links[0])
data = urllib.request.urlopen(url, timeout=120).read()
with tarfile.open(fileobj=io.BytesIO(data)) as tar:
    top = f"mamba_ssm-{version}/mamba_ssm/"
    members = [m for m in tar.getmembers() if m.name.startswith(top) and m.name.endswith(".py")]
    for m in members:
        m.name = "mamba_src/mamba_ssm/" + m.name[len(top):]
    tar.extractall(out, members=members, filter="data")
print(f"mamba-ssm {version}: {len(members)} source files in {out}/mamba_src")
PYEOF
ls -1 "$W"
du -sh "$W"
