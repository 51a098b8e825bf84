# The two commands a user needs: `make demo` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
SGLANG_VERSION := 0.5.23
# Test processes (pytest-xdist, whole modules each): the server tests wait on imports, links
# and idle servers much of the time, two of them share a 2-core machine well.
TEST_WORKERS ?= 2

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
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=25

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check sglang_cacheflow tests

demo: $(STAMP)
	$(VENV)/bin/sglang-cacheflow demo

bench-planner: $(STAMP)
	$(VENV)/bin/sglang-cacheflow planner-bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info
