# Two commands on a fresh machine: `make run` and `make test`. Only Python 3.11+ is required.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test bench drill lint format clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

## Migrate, seed demo data, start the simulated EHR, a worker and the console on http://127.0.0.1:5000
run: install
	$(BIN)/recon run

## The whole suite (unit, integration, web, browser). Benchmarks are separate: make bench
test: install
	$(BIN)/python -m pytest tests --ignore=tests/perf -q

## Benchmarks: each prints its figures beside the target
bench: install
	$(BIN)/python -m pytest tests/perf -q -s -p no:randomly

## Chaos drill: 400 messages (FHIR and HL7 v2) through worker, Redis and web kills and EHR bursts of
## 503/429/resets; prints its table, exit 1 unless every message is applied exactly once (docs/RUNBOOK.md).
## On PostgreSQL: make drill DRILL_ARGS="--postgres postgresql+psycopg://root@127.0.0.1:5432/postgres --runs 5"
drill: install
	$(BIN)/python -m tests.chaos.drill $(DRILL_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest-instance instance/*.db* instance/redis*
