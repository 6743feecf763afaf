# Two commands do all set-up on a fresh machine with Python 3.11+:
#   make demo   runs the demo on an embedded PostgreSQL (nothing else to install)
#   make test   runs the whole test suite on an embedded PostgreSQL and S3 endpoint
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo lint typecheck bench clean

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "worker_core needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

demo: $(VENV)/.installed
	$(BIN)/worker-core demo

lint: $(VENV)/.installed
	$(BIN)/ruff check worker_core tests bench examples
	$(BIN)/ruff format --check worker_core tests bench examples

typecheck: $(VENV)/.installed
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python bench/enqueue.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/limits.py

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
