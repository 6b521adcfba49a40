# `make demo` on a fresh machine: virtualenv, CPU torch, requirements, then the offline end-to-end demo.
# `make test`: the same environment plus pytest, then the test suite.

PYTHON ?= python3
VENV ?= .venv
# The CPU build on a CPU-only machine: a bare `pip install torch` may pull a multi-GB CUDA build.
# On a GPU node: make demo TORCH=torch
TORCH ?= torch==2.13.0
DEMO_ARGS ?=

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: demo demo-quick test install clean-demo

demo: $(VENV)/.installed
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

demo-quick: $(VENV)/.installed
	$(BIN)/python scripts/demo.py --quick $(DEMO_ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q tests

install: $(VENV)/.installed

# Stamp files: pip runs again only when requirements.txt changes (or the venv is new), so a second
# `make demo` starts the demo at once and works offline.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -r requirements.txt
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) pytest
	touch $@

clean-demo:
	rm -rf demo_output
