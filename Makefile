# Two commands do all set-up on a fresh machine with Python 3.11+:
#   make demo   runs the demo on an embedded PostgreSQL (nothing else to install)
#   make test   lints (ruff), type-checks (mypy --strict over the package, tests,
#               examples and bench) and runs the whole suite on an embedded
#               PostgreSQL and S3 endpoint
# Other Pythons side by side: make test PYTHON=python3.13 VENV=.venv-3.13
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Extra pytest arguments, e.g. PYTEST_ARGS='-m "not slow"' or PYTEST_ARGS=tests/unit
PYTEST_ARGS ?=
# `make fuzz`: property tests only, random examples, FUZZ_FACTOR times as many as CI.
FUZZ_FACTOR ?= 20
SOURCES := worker_core tests bench examples

# pyenv installs several Pythons but puts only its global one on PATH: let its shims
# find the others too (`make test PYTHON=python3.13`), the global one staying first.
ifneq ($(shell command -v pyenv 2>/dev/null),)
PYENV_VERSION ?= $(shell v=$$(pyenv version-name 2>/dev/null); printf '%s' "$$v"; pyenv versions --bare 2>/dev/null | grep -E '^3\.[0-9]+\.[0-9]+$$' | grep -vx "$$v" | sed 's/^/:/' | tr -d '\n')
export PYENV_VERSION
endif

.PHONY: test suite demo lint typecheck fuzz bench clean system-deps browser-deps screenshot bench-dashboard

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "worker_core needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

test: lint typecheck suite

suite: $(VENV)/.installed system-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Debian packages of the infrastructure-fault tests (tests/scale): PgBouncer, and
# iproute2 for network namespaces and tc; of the console's browser tests: chromium and
# chromium-driver. Installed as root on Debian/Ubuntu only;
# elsewhere those tests skip with one line (with CI=true they fail instead).
SYSTEM_PACKAGES := pgbouncer iproute2 chromium chromium-driver
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  if [ -n "$$missing" ]; then \
	    flock /tmp/apt.lock apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive flock /tmp/apt.lock \
	      apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	  fi; \
	fi

# The browser tests (tests/browser) drive Debian's chromium through its chromedriver,
# never a downloaded browser: both are system packages, installed with the others.
browser-deps: system-deps

# docs/console-overview.png: the overview under load, taken by the test suite's browser.
screenshot: $(VENV)/.installed browser-deps
	WORKER_CORE_SCREENSHOT=docs/console-overview.png $(BIN)/python -m pytest -q tests/browser/test_screenshot.py

bench-dashboard: $(VENV)/.installed
	$(BIN)/python bench/dashboard_load.py

demo: $(VENV)/.installed
	$(BIN)/worker-core demo

lint: $(VENV)/.installed
	$(BIN)/ruff check $(SOURCES)
	$(BIN)/ruff format --check $(SOURCES)

typecheck: $(VENV)/.installed
	$(BIN)/mypy --strict

fuzz: $(VENV)/.installed
	HYPOTHESIS_PROFILE=fuzz WORKER_CORE_FUZZ_FACTOR=$(FUZZ_FACTOR) \
		$(BIN)/python -m pytest -q -m hypothesis --hypothesis-show-statistics \
		-p no:randomly --timeout=3600 $(PYTEST_ARGS)

bench: $(VENV)/.installed
	$(BIN)/python bench/enqueue.py
	$(BIN)/python bench/throughput.py
	$(BIN)/python bench/limits.py

clean:
	rm -rf .venv .venv-* build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
