# The README's two commands: `make up` and `make test`. Everything installs into .venv.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Every package, transitive ones included, pinned with hashes (docs/dependencies.md). This is the
# CPU test machines' lock; the Dockerfile and bench/device_*.sh install their own from requirements/.
LOCK := requirements/cpu.txt
TOOLS := requirements/tools.txt
# Where this kind of machine keeps wheels it carries (torch's CPU build): pip's find-links.
FIND_LINKS := $(addprefix --find-links ,$(wildcard $(or $(PIP_FIND_LINKS),/opt/wheels)))
# A changed pyproject.toml or lock names a new stamp, so the venv is brought to it.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml $(LOCK) $(TOOLS) | sha1sum | cut -c1-12)
PYTEST_ARGS ?=
SOURCES := api core worker trainer tuneq migrations
# Test processes (pytest-xdist). worksteal hands a process that ran out of tests the second half
# of another's, so the long training tests do not all end up in one queue.
TEST_PROCS ?= 3
# Every run prints its 25 slowest tests, so a test that grows slow is seen where it is run.
PYTEST := $(BIN)/python -m pytest --durations=25
# e.g. LOCK_ARGS="--upgrade-package httpx2" (or --upgrade) to move pins `make lock` would keep.
LOCK_ARGS ?=

.PHONY: up test venv lock compile unit integration e2e gpu clean

$(STAMP): pyproject.toml $(LOCK) $(TOOLS)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(TOOLS)
	# Exactly the lock, each file checked against its hash; --no-deps, since the lock is the whole
	# closure. uv (the tools lock's, hash-checked) installs it in seconds where pip takes a minute
	# or more. It does not read pip's configuration, so the find-links that carry this machine's
	# CPU build of torch as a file are passed on. --compile-bytecode as pip does: where
	# PYTHONDONTWRITEBYTECODE is set (these machines), nothing else ever writes the .pyc files, and
	# every process would compile torch and transformers again, doubling their import.
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode $(FIND_LINKS) --require-hashes --no-deps -r $(LOCK)
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	rm -f $(VENV)/.installed-*
	touch $@

venv: $(STAMP)

# Re-resolves every lock in requirements/ from pyproject.toml (run on purpose, then `make test`).
lock:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r $(TOOLS)
	$(BIN)/python requirements/lock.py compile $(BIN)/uv $(LOCK_ARGS)

up: compile
	$(BIN)/tuneq up

# GPU tests are deselected here (CI has no GPU); they run on a lent GPU with `make gpu`.
# tuneq's own modules compiled ahead (compileall skips those up to date): the suite starts some
# hundred processes, and where PYTHONDONTWRITEBYTECODE is set each would compile them again.
compile: $(STAMP)
	$(BIN)/python -m compileall -q $(SOURCES)

test: compile
	$(PYTEST) -m "not gpu" -n $(TEST_PROCS) --dist worksteal $(PYTEST_ARGS)

unit: compile
	$(PYTEST) tests/unit -n $(TEST_PROCS) --dist worksteal $(PYTEST_ARGS)

integration: compile
	$(PYTEST) tests/integration -n $(TEST_PROCS) --dist worksteal $(PYTEST_ARGS)

e2e: compile
	$(PYTEST) tests/e2e -n $(TEST_PROCS) --dist worksteal $(PYTEST_ARGS)

gpu:
	python3 -m pytest -m gpu tests/gpu $(PYTEST_ARGS)

clean:
	rm -rf var .pytest_cache
