# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check lint bench clean

$(STAMP): requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -r requirements-dev.txt
	touch $@

## run: the bridge on :5001 with live test messages and the demo service (starts nats-server if needed)
run: $(STAMP)
	$(BIN)/python scripts/dev_run.py $(ARGS)

## test: lint, then the whole suite
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## check: lint, then every test not marked slow, four at a time (about a minute): the inner loop
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -m "not slow" -n 4 -q $(PYTEST_ARGS)

## bench: the benchmark beside nats-server's own WebSocket listener (a few minutes); writes bench/RESULTS.md
bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
