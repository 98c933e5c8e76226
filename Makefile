# make demo: a demo MCP server behind the gateway, with a working token printed.
# make test: the whole suite. Both create .venv and install everything first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml tests/node/package.json tests/node/package-lock.json
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	cd tests/node && npm ci --no-audit --no-fund --loglevel=error
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

test: $(STAMP)
	$(BIN)/ruff check gateway tests examples bench
	$(BIN)/mypy gateway
	$(BIN)/pytest -q

# Benchmarks, not tests: ratios measured side by side (bench/README.md). Needs wrk and nginx (Debian packages);
# B3 installs ContextForge into bench/.contextforge with pyenv's Python 3.12 on first run.
bench: $(STAMP)
	@command -v wrk >/dev/null || { echo "make bench needs wrk (and nginx): apt-get install wrk nginx"; exit 1; }
	$(BIN)/python bench/bench_decide.py
	$(BIN)/python bench/bench_http.py
	$(BIN)/python bench/bench_audit.py

lint: $(STAMP)
	$(BIN)/ruff check gateway tests examples bench
	$(BIN)/mypy gateway

clean:
	rm -rf $(VENV) tests/node/node_modules .demo
