# The entry points the README documents: demo, test, lint, bench (plus chaos and services).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export SMW_DATABASE_URL ?= mysql+mysqldb://root@127.0.0.1:3306/smw_test
export SMW_KAFKA_BOOTSTRAP ?= 127.0.0.1:9092

.PHONY: demo test unit lint bench chaos services services-down clean

$(STAMP): pyproject.toml
	deploy/local/build-deps.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Start MariaDB and Kafka locally unless SMW_SKIP_SERVICES=1 (you bring your own).
services: $(STAMP)
	@if [ "$${SMW_SKIP_SERVICES:-0}" = 1 ]; then echo "using services at SMW_DATABASE_URL / SMW_KAFKA_BOOTSTRAP"; \
	else PYTHON=$(abspath $(BIN)/python) deploy/local/services.sh up; fi

services-down:
	deploy/local/services.sh down

demo: $(STAMP)
	$(BIN)/smw demo

test: services
	$(BIN)/python -m pytest -m "unit or integration or acceptance" $(PYTEST_ARGS)

unit: $(STAMP)
	$(BIN)/python -m pytest -m unit $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: services
	$(BIN)/python -m bench $(BENCH_ARGS)

chaos: services
	$(BIN)/python -m tests.chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
