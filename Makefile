# Two commands do all set-up on a fresh machine with Python 3.11+:
#   make demo   runs the demo on an embedded PostgreSQL (nothing else to install)
#   make test   runs the whole test suite on an embedded PostgreSQL and S3 endpoint
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo lint typecheck bench clean system-deps

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "worker_core needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

test: $(VENV)/.installed system-deps
	$(BIN)/python -m pytest -q

# Debian packages of the infrastructure-fault tests (tests/scale): PgBouncer, and
# iproute2 for network namespaces and tc. Installed as root on Debian/Ubuntu only;
# elsewhere those tests skip with one line (with CI=true they fail instead).
SYSTEM_PACKAGES := pgbouncer iproute2
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    flock /tmp/apt.lock apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive flock /tmp/apt.lock \
	      apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	fi

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

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
