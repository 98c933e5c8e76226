# make demo: a demo MCP server behind the gateway, with a working token printed.
# make test: the whole suite. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-loop fuzz soak lint bench clean

$(STAMP): pyproject.toml requirements.lock tests/node/package.json tests/node/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	@# the runtime dependencies at the versions the container image ships (hash-checked), then the dev tools
	$(BIN)/pip install --quiet --require-hashes -r requirements.lock
	$(BIN)/pip install --quiet -e '.[dev]'
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	@# The console's browser tests drive Debian's chromium with Playwright (executable_path, no downloaded browser)
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@# Several replicas behind a real load balancer (tests/test_replicas.py): Debian's nginx
	command -v nginx >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light >/dev/null; }
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/ruff check gateway tests examples bench deploy
	$(BIN)/mypy gateway
	$(BIN)/pytest -q --durations=15  # the slowest, to keep the suite under its 10 minutes

# The suite N times in a row (default 15), stopping at the first failure: a flaky test is a defect.
test-loop: $(STAMP)
	@for i in $$(seq 1 $${N:-15}); do echo "== make test, run $$i of $${N:-15}"; $(MAKE) --no-print-directory test || exit 1; done

# Long fuzzing runs (every parser, then the HTTP fuzzer against serve): counts and rates per target.
fuzz: $(STAMP)
	$(BIN)/python -m tests.fuzz_main

# 10 minutes of mixed traffic at 64 connections against serve: statuses, audit rows, RSS and fds over time.
soak: $(STAMP)
	$(BIN)/python -m tests.soak

# Benchmarks, not tests: ratios measured side by side (bench/README.md). wrk and nginx are Debian's (installed here
# when missing); B3 installs ContextForge into bench/.contextforge with pyenv's Python 3.12 on first run.
bench: $(STAMP)
	command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
	$(BIN)/python bench/bench_decide.py
	$(BIN)/python bench/bench_http.py
	$(BIN)/python bench/bench_audit.py
	$(BIN)/python bench/bench_stdio.py
	$(BIN)/python bench/bench_quota.py
	$(BIN)/python bench/bench_lag.py
	$(BIN)/python bench/targets.py

lint: $(STAMP)
	$(BIN)/ruff check gateway tests examples bench deploy
	$(BIN)/mypy gateway

clean:
	rm -rf $(VENV) tests/node/node_modules .demo
