# Two commands for a fresh clone: `make pipeline` and `make test`.
# Both create the virtual environment on first use (.venv, ~2 min, ~2.3 GB).

PYTHON ?= python3
VENV   ?= .venv
# On our CPU-only machines this wheel is local and small; a bare `torch` would pull a multi-GB CUDA
# build. Elsewhere, override it: `make TORCH_SPEC=torch pipeline` (pyproject keeps torch a range).
TORCH_SPEC ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PROFILE ?=
SET    ?=

export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: pipeline test lint env clean

pipeline: $(STAMP)
	$(BIN)/sparsellama run $(if $(PROFILE),--profile $(PROFILE)) $(foreach s,$(SET),--set $(s))

test: $(STAMP)
	$(BIN)/python -m pytest -q

# ruff (pinned in the test extra): lint rules and the formatter's check, configured in pyproject.toml.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

env: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

clean:
	rm -rf data/corpus data/tasks models metrics plots reports .resume .stamps .lmeval .pipeline.lock mlflow.db mlartifacts .prefect
