# Steward: `make run` starts the whole suite, `make test` runs every check.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BIN := $(VENV)/bin
INSTALLED := $(VENV)/.installed
BUF := node_modules/.bin/buf

.PHONY: install run test lint protos clean

$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

$(BUF): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(INSTALLED) $(BUF)

## Starts all four services in one process on localhost:50051 (SQLite under ./data).
run: $(INSTALLED)
	$(BIN)/steward keys init
	$(BIN)/steward serve

## Regenerates the Python code of the protos into services/_proto/.
protos: $(INSTALLED)
	$(PY) tools/gen_protos.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BUF) lint protos

## Lint, types, proto lint, the stale-codegen check (a test) and the whole test suite.
test: lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache

BENCH_QUALITY_INSTALLED := $(VENV)/.installed-bench-quality

$(BENCH_QUALITY_INSTALLED): pyproject.toml $(INSTALLED)
	$(PY) -m pip install --quiet -e '.[bench-quality]'
	touch $@

.PHONY: bench-identity-quality
## Pairwise precision/recall/F1 of identity resolution on the FEBRL data sets (figures only).
bench-identity-quality: $(BENCH_QUALITY_INSTALLED)
	$(PY) bench/identity_quality.py

FUZZ_INSTALLED := $(VENV)/.installed-fuzz
FUZZ_TARGETS := tcf identifiers rule_set cel_condition ledger_export
FUZZ_SECONDS ?= 300

$(FUZZ_INSTALLED): pyproject.toml $(INSTALLED)
	$(PY) -m pip install --quiet -e '.[fuzz]'
	touch $@

.PHONY: fuzz
## Each parser under atheris, coverage-guided, FUZZ_SECONDS each (crashes land in .fuzz/).
fuzz: $(FUZZ_INSTALLED)
	mkdir -p .fuzz
	for target in $(FUZZ_TARGETS); do \
		$(PY) fuzz/$$target.py -max_total_time=$(FUZZ_SECONDS) -artifact_prefix=.fuzz/$$target- \
			|| exit 1; \
	done
