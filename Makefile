# Targets humans and CI both run. `make run` and `make test` set everything up themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install ref run test check bench clean docker-build docker-up docker-down

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# The reference implementation (asap-protocol 2.5.10, Python 3.13) for interop tests and bench.
ref:
	@scripts/ref-venv.sh >/dev/null || { [ -z "$$CI" ] && echo "make ref: reference venv unavailable; interop tests will be skipped" >&2; }

run: install
	$(BIN)/asap demo

test: install ref
	$(BIN)/python -m pytest -q

check: install
	$(BIN)/ruff check asap skills tests bench
	$(BIN)/ruff format --check asap skills
	$(BIN)/mypy

# docs/benchmarks.md. BENCH_ARGS goes to bench/run.py, e.g. BENCH_ARGS="--runs 1 --duration 2".
bench: install ref $(VENV)/.bench-installed
	$(BIN)/python bench/run.py $(BENCH_ARGS)
	$(BIN)/python bench/chart.py
	$(BIN)/python bench/orchestration.py
	$(BIN)/python bench/state.py

# matplotlib (the `bench` extra) for bench/chart.py: installed here, not by install or test.
$(VENV)/.bench-installed: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

clean:
	rm -rf $(VENV) .venv-ref .pytest_cache .ruff_cache .mypy_cache

# The container image and the compose fleet (docs/deployment.md); need a Docker engine.
COMPOSE := docker compose -f docker/compose.yaml
WORKERS ?= 3

docker-build:
	docker build -f docker/Dockerfile -t asap:latest .

docker-up: docker-build
	$(COMPOSE) up -d --scale worker=$(WORKERS)

docker-down:
	$(COMPOSE) down
