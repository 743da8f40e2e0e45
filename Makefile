# The two commands a new user runs: `make demo` and `make test`.
# Everything is installed into .venv from the package registries; nothing else is downloaded.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
# For the tests that run mamba-ssm's Triton SSD kernels on this CPU under Triton's interpreter
# (tests/model/triton_interpreter.py): Triton and mamba-ssm's Python sources, kept outside .venv
# so that every other process runs as a CPU user's install does, without Triton.
TRITON_VERSION    := 3.9.0
MAMBA_SSM_VERSION := 2.3.2.post1
INTERPRETER := .cache/triton/.installed-$(TRITON_VERSION) .cache/mamba_src/.installed-$(MAMBA_SSM_VERSION)

# DeepSpeed on CPU: gloo backend, and its JIT-built comm op cached in the repo so
# `make test` compiles it once (about 50 s on 2 cores), not once per test.
export DS_ACCELERATOR := cpu
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions
export OMP_NUM_THREADS ?= 1
export PYTHONHASHSEED := 0

.PHONY: setup test test-fast demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned: the CPU wheel. An unpinned torch would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

.cache/triton/.installed-$(TRITON_VERSION): | $(STAMP)
	rm -rf .cache/triton
	$(PIP) install -q --no-deps --target .cache/triton triton==$(TRITON_VERSION)
	touch $@

.cache/mamba_src/.installed-$(MAMBA_SSM_VERSION): scripts/fetch_mamba_src.py | $(STAMP)
	$(PY) scripts/fetch_mamba_src.py .cache/mamba_src $(MAMBA_SSM_VERSION)
	touch $@

test: setup $(INTERPRETER)
	$(PY) -m pytest tests -q --durations=30

# The tests without the multi-process and SLURM ones: a quick check while editing.
test-fast: setup
	$(PY) -m pytest tests -q -m "not slow and not slurm"

demo: setup
	bash scripts/demo.sh

bench: setup
	mkdir -p bench-results
	for b in tests/bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .cache bench-results runs mlflow.db mlartifacts demo-data
