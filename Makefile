# `make demo` and `make test` bootstrap .venv on first use (Python 3.11: torch 2.14.1 wheels).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/nnobf demo --task classification --model resnet18 --tiers "free=60%,pro=85%,premium=full"

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_forward.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info runs
