# Two commands: `make run` (install + serve) and `make test` (install + lint + types + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= config.yaml
# Separately installable example plugins: installed with LogStack, their tests run with ours.
PLUGINS := plugins/logstack-acme-iban

.PHONY: install run test lint typecheck pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet $(addprefix -e ,$(PLUGINS))

run: install
	$(BIN)/logstack serve --config $(CONFIG)

lint: install
	$(BIN)/ruff check logstack stages plugins tests benchmarks
	$(BIN)/ruff format --check logstack stages plugins tests benchmarks

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest -q tests $(addsuffix /tests,$(PLUGINS))

test: lint typecheck pytest

bench: install
	$(BIN)/python -m logstack.bench

clean:
	rm -rf $(VENV) wal .pytest_cache .mypy_cache .ruff_cache
