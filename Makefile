# aichat-backend developer workflow. `make run` and `make test` set everything up themselves.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
PROVIDER := $(if $(OPENAI_API_KEY),openai,mock)
PYTEST_ARGS ?=

.PHONY: help setup run test lint bench clean

help:
	@echo "make run        start the daemon on 127.0.0.1:3001 (mock LLM unless OPENAI_API_KEY is set)"
	@echo "make test       install everything and run the whole test suite"
	@echo "make lint       ruff and mypy"
	@echo "make bench      benchmarks (tables printed)"
	@echo "make rpm        binary RPM + SRPM under build/rpm (see PACKAGING.md)"
	@echo "make system-test  build the RPM and test it under a real systemd in a container"
	@echo "make clean      remove build output, the venv and node_modules"

$(STAMP): requirements.txt requirements-dev.txt setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip==26.3 setuptools==84.2.1 wheel==0.48.0
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps -e . --config-settings editable_mode=compat
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

setup: $(STAMP) $(NODE_STAMP)

run: setup
	mkdir -p var
	$(BIN)/aichat-backend -config dev/config.yaml -llm-provider $(PROVIDER)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m benchmarks

clean: clean-rpm
	rm -rf $(VENV) node_modules build dist *.egg-info var .pytest_cache .mypy_cache .ruff_cache
	find . -name __pycache__ -prune -exec rm -rf {} +
	rm -f twisted/plugins/dropin.cache

-include rpm.mk
