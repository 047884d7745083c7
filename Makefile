# The two set-up commands of the README: `make run` and `make test`; `make test-slow` is the slow lane CI runs
# after them. Each installs what a fresh machine lacks first (once per interpreter; see ENV): `make run` only
# what a run needs, `make test` the test and tracking extras as well.
PY ?= python3
ARGS ?=
# Stamps per environment (the interpreter's sys.prefix) and extent (run, test): an install into one Python says
# nothing of another, so `make test PY=.venv/bin/python` after a `make test` with the system's python still
# installs into the venv, and `make test` after `make run` adds the extras.
ENV := $(shell $(PY) -c "import hashlib, sys; print(hashlib.sha256(sys.prefix.encode()).hexdigest()[:12])")
RUN_STAMP := .installed-run-$(ENV)
TEST_STAMP := .installed-test-$(ENV)

.PHONY: run test test-slow bench
# What a run needs and nothing more: raysim and its dependencies, no test or tracking extras.
$(RUN_STAMP): pyproject.toml constraints.txt
	# The CPU wheel of torch first: any other torch spec pulls GBs of CUDA packages.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	# Every dependency at the version CI ran (constraints.txt; cluster.yaml installs the same).
	$(PY) -m pip install -c constraints.txt -e .
	touch $(RUN_STAMP)

# The tests add their extras: pytest and friends, and the trackers' packages, which tests/test_tracking.py
# reads back.
$(TEST_STAMP): $(RUN_STAMP)
	$(PY) -m pip install -c constraints.txt -e ".[test,tracking]"
	touch $(TEST_STAMP)

run: $(RUN_STAMP)
	$(PY) -m raysim.cli run $(ARGS)

test: $(TEST_STAMP)
	$(PY) -m pytest

# The tests marked slow (pyproject.toml's addopts leaves them out of `make test`).
test-slow: $(TEST_STAMP)
	$(PY) -m pytest -m slow

bench: $(RUN_STAMP)
	$(PY) bench/round_overhead.py
	$(PY) bench/device_overhead.py
	$(PY) bench/population_memory.py
