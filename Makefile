# `make demo` on a fresh machine: virtualenv, CPU torch, requirements, then the offline end-to-end demo.
# `make test`: the same environment plus pytest and pytest-xdist, then the test suite on TEST_WORKERS processes
# (the command .ci/run runs; see there for the flags).

PYTHON ?= python3
VENV ?= .venv
# The CPU build on a CPU-only machine: a bare `pip install torch` may pull a multi-GB CUDA build.
# On a GPU node: make demo TORCH=torch
TORCH ?= torch==2.13.0
DEMO_ARGS ?=
TEST_WORKERS ?= 2

BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install -q --disable-pip-version-check

.PHONY: demo demo-quick test install clean-demo

demo: $(VENV)/.installed
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

demo-quick: $(VENV)/.installed
	$(BIN)/python scripts/demo.py --quick $(DEMO_ARGS)

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

install: $(VENV)/.installed

# Stamp files: pip runs again only when requirements.txt changes (or the venv is new), so a second
# `make demo` starts the demo at once and works offline.
$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: requirements.txt | $(BIN)/python
	$(PIP) "$(TORCH)"
	$(PIP) -r requirements.txt
	touch $@

# Also after a Makefile change: a venv made before pytest-xdist was on this list gets it.
$(VENV)/.installed-test: $(VENV)/.installed Makefile
	$(PIP) pytest pytest-xdist
	touch $@

clean-demo:
	rm -rf demo_output
