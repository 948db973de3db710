# The front door: every target a person (or CI) needs. `make install` is the only one that
# touches the network (PyPI); the rest run on what it installed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test unit integration lint bench dev clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is needed (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## make run: the whole job on the embedded stack: broker, Postgres+pgvector, embedding server,
## publish the sample corpus, ingest it until idle, search it, clean up.
run: install
	$(BIN)/python -m worker.dev.demo

## make test: unit tests, then integration tests against a real broker and real Postgres.
test: install
	$(BIN)/python -m pytest tests -q

unit: install
	$(BIN)/python -m pytest tests/unit -q

integration: install
	$(BIN)/python -m pytest tests/integration -q

lint: install
	$(BIN)/ruff check worker tests bench
	$(BIN)/ruff format --check worker tests bench
	$(BIN)/mypy

bench: install
	$(BIN)/python -m bench

dev: install
	$(BIN)/ingest-worker dev

clean:
	rm -rf $(VENV) .run .pytest_cache .mypy_cache .ruff_cache
