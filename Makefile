# Two commands: `make run` (install + serve) and `make test` (install + lint + types + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml

.PHONY: install run test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'

run: install
	$(BIN)/logstack serve --config $(CONFIG)

lint: install
	$(BIN)/ruff check logstack stages plugins tests benchmarks
	$(BIN)/ruff format --check logstack stages plugins tests benchmarks

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest -q tests

test: lint typecheck pytest

bench: install
	$(BIN)/python -m logstack.bench

clean:
	rm -rf $(VENV) wal .pytest_cache .mypy_cache .ruff_cache
