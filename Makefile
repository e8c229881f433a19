# medexp - every target sets up what it needs; `make train` and `make test` work on a fresh clone.
#
# TORCH_SPEC pins the CPU build that CI and this machine use. On a GPU machine pick a CUDA build, e.g.
#   make install TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu126
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(VENV)/bin/pip
PY := $(VENV)/bin/python
MEDEXP := $(VENV)/bin/medexp
STAMP := $(VENV)/.installed
TEST_WORKERS ?= 2

SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)

.PHONY: help install chromium train test test-fast lint format ui clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
	$(PIP) install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP) ## create .venv/ and install medexp into it (CPU torch unless TORCH_SPEC/TORCH_INDEX say otherwise)

train: $(STAMP) ## train the default model on the demo data (ARGS="kernel=mixed lr=1e-3" to override)
	$(MEDEXP) train $(ARGS)

chromium: ## Debian's chromium for the browser test (Playwright drives it; no browser download)
	@command -v chromium >/dev/null || { $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null; } || \
	  echo "warning: could not install chromium; tests/test_ui.py's browser test will be skipped"

test: $(STAMP) chromium ## run the test suite (what CI runs); installs Debian's chromium for the browser test
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-fast: $(STAMP) ## the unit tests only (no `medexp` subprocess runs, nothing slow): run before each change
	$(PY) -m pytest -q -m "not slow and not e2e" $(PYTEST_ARGS)

lint: $(STAMP) ## ruff lint and format check, and the import layering (tools/check_layers.py)
	$(VENV)/bin/ruff check medexp tests scripts tools
	$(VENV)/bin/ruff format --check medexp tests scripts tools
	$(PY) -m tools.check_layers

format: $(STAMP) ## apply ruff formatting and safe fixes
	$(VENV)/bin/ruff check --fix medexp tests scripts
	$(VENV)/bin/ruff format medexp tests scripts

ui: $(STAMP) ## MLflow UI on 127.0.0.1:5000 over the project's store
	$(MEDEXP) ui

clean: ## remove outputs/ (runs, mlflow.db, caches); keeps .venv/
	rm -rf outputs multirun
