# The README's two commands: `make up` and `make test`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
# Test processes (pytest-xdist). worksteal hands a process that ran out of tests the second half
# of another's, so the long training tests do not all end up in one queue.
TEST_PROCS ?= 3
# Every run prints its 25 slowest tests, so a test that grows slow is seen where it is run.
PYTEST := $(BIN)/python -m pytest --durations=25

.PHONY: up test venv unit integration e2e gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first and by exact version: an unpinned torch pulls a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[test]'
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

up: $(STAMP)
	$(BIN)/tuneq up

# GPU tests are deselected here (CI has no GPU); they run on a lent GPU with `make gpu`.
test: $(STAMP)
	$(PYTEST) -m "not gpu" -n $(TEST_PROCS) --dist worksteal $(PYTEST_ARGS)

unit: $(STAMP)
	$(PYTEST) tests/unit -n $(TEST_PROCS) --dist worksteal $(PYTEST_ARGS)

integration: $(STAMP)
	$(PYTEST) tests/integration -n $(TEST_PROCS) --dist worksteal $(PYTEST_ARGS)

e2e: $(STAMP)
	$(PYTEST) tests/e2e -n $(TEST_PROCS) --dist worksteal $(PYTEST_ARGS)

gpu:
	python3 -m pytest -m gpu tests/gpu $(PYTEST_ARGS)

clean:
	rm -rf var .pytest_cache
