# Heimdall Inference — one way to run each thing. `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TRAIN_STAMP := $(VENV)/.installed-train
# Every dependency of the service and its test tools, pinned (`make lock` rebuilds it).
# torch stays out of it: the train extra pins torch==2.13.0 on its own.
LOCK := requirements/dev.lock

.DEFAULT_GOAL := help

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  \033[36m%-14s\033[0m %s\n", $$1, $$2}'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# The project itself is installed constrained by the lock, not with --no-deps: a
# dependency added to pyproject.toml but not locked yet still installs (unpinned).
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/pip install --quiet -r $(LOCK)
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[dev]'
	@touch $@

$(TRAIN_STAMP): pyproject.toml $(LOCK) $(STAMP)
	$(BIN)/pip install --quiet -c $(LOCK) -e '.[dev,train]'
	@touch $@

install: $(STAMP) ## Create .venv and install the service with the test tools
install-train: $(TRAIN_STAMP) ## Also install the train extra (torch 2.13.0, CPU)

redis: $(STAMP) ## Make sure a Redis answers at HEIMDALL_REDIS_URL (start one if not)
	@bash deploy/ensure-redis.sh

register: $(STAMP) ## Register the shipped model in the registry (idempotent)
	$(BIN)/heimdall model register --if-missing

# supervisord (deploy/supervisord.conf) restarts whichever process exits, alone.
# Every process gets .env (if any), then var/run.env (written by deploy/ensure-redis.sh:
# the Redis URLs with their password), so a generated value wins over a stale copy.
run: install redis register ## Set up and run API + worker + Flower in the foreground (Ctrl-C stops)
	@mkdir -p var/run
	set -a; [ ! -f .env ] || . ./.env; [ ! -f var/run.env ] || . var/run.env; set +a; \
	export PATH="$(CURDIR)/$(BIN):$$PATH" HEIMDALL_RUN_DIR="$${HEIMDALL_RUN_DIR:-$(CURDIR)/var/run}"; \
	mkdir -p "$$HEIMDALL_RUN_DIR"; \
	exec $(BIN)/supervisord -c deploy/supervisord.conf

test: install-train ## Install everything and run the whole test suite (with coverage)
	@bash deploy/ensure-redis.sh --binary-only
	@bash deploy/ensure-tools.sh
	rm -f .coverage .coverage.*
	$(BIN)/python -m pytest --cov --cov-report=term --cov-report=json:var/coverage.json

lint: install ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install ## Format the code with ruff
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

train: install-train ## Re-train the shipped model from simulated scenes (~10 min on 2 cores)
	$(BIN)/heimdall train

evaluate: install ## Model vs baseline on every scene family (held-out, second law, clean, ...)
	$(BIN)/heimdall evaluate --json

BENCH_ARGS ?=
bench: install ## wrk at 100 connections: the service vs mlflow serve vs no queue (~10 min; benchmarks/README.md)
	@bash deploy/ensure-redis.sh --binary-only
	@bash benchmarks/ensure-wrk.sh
	$(BIN)/python -m benchmarks.bench $(BENCH_ARGS)

bench-quick: install ## The same benchmark as a smoke run: 3 s per pass, 8 connections (~4 min)
	@bash deploy/ensure-redis.sh --binary-only
	@bash benchmarks/ensure-wrk.sh
	$(BIN)/python -m benchmarks.bench --quick --out var/bench-quick.json $(BENCH_ARGS)

lock: install ## Re-resolve requirements/dev.lock from pyproject.toml (newest allowed versions)
	$(BIN)/pip-compile --quiet --upgrade --extra dev --strip-extras --allow-unsafe \
		--no-emit-index-url --no-emit-find-links -o $(LOCK) pyproject.toml

audit: install ## pip-audit the locked dependencies (PyPI advisories); triage in docs/operations.md
	$(BIN)/pip-audit --requirement $(LOCK) --no-deps --disable-pip --strict --progress-spinner off

clean: ## Remove local state (var/) and caches, keep .venv
	rm -rf var .pytest_cache .mypy_cache .ruff_cache .coverage .coverage.*

.PHONY: help install install-train redis register run test lint format train evaluate bench bench-quick lock audit clean
