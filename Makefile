# Two commands do all set-up on a fresh machine with Python 3.11+:
#   make demo   runs the demo on an embedded PostgreSQL (nothing else to install)
#   make test   runs the whole test suite on an embedded PostgreSQL and S3 endpoint
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: test demo lint typecheck bench clean browser-deps screenshot bench-dashboard

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "worker_core needs Python 3.11 or newer (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $@

test: $(VENV)/.installed browser-deps
	$(BIN)/python -m pytest -q

# The browser tests drive Debian's chromium through its chromedriver (never a
# downloaded browser). Installed with apt when missing and allowed (root, or sudo
# without a password); otherwise one line says how, and the browser tests skip
# (in CI, CI=true, they fail instead).
CHROMIUM ?= /usr/bin/chromium
CHROMEDRIVER ?= /usr/bin/chromedriver
browser-deps:
	@if [ -x $(CHROMIUM) ] && [ -x $(CHROMEDRIVER) ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then SUDO=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "browser tests need Debian's chromium and chromium-driver: sudo apt-get install chromium chromium-driver"; exit 0; fi; \
	echo "installing chromium and chromium-driver (apt)"; \
	$$SUDO flock /tmp/apt.lock sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null'

# docs/console-overview.png: the overview under load, taken by the test suite's browser.
screenshot: $(VENV)/.installed browser-deps
	WORKER_CORE_SCREENSHOT=docs/console-overview.png $(BIN)/python -m pytest -q tests/browser/test_screenshot.py

bench-dashboard: $(VENV)/.installed
	$(BIN)/python bench/dashboard_load.py

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
