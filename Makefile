# One-command setup: `make demo` and `make test` each create .venv if needed and install into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install bench bench-query bench-metrics clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m commands.demo

# Two pytest-xdist worker processes, each test file whole on one of them (its module fixtures built once; the Ray
# and Docker tests never beside another of their file): the whole suite in 10.5 minutes instead of 21 on a 2-core
# VM (2026-12-04). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The suite without the marked tests (pyproject.toml lists the marks): no servers, subprocess runs, browser,
# Docker, PostgreSQL, Ray or GPU.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m "not slow and not browser and not docker and not postgres and not ray and not gpu"

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_index.py

bench-query: $(STAMP)
	$(BIN)/python benchmarks/bench_query.py

bench-metrics: $(STAMP)
	$(BIN)/python benchmarks/bench_metrics.py

clean:
	rm -rf $(VENV) index build *.egg-info
