# The two set-up commands of the README: `make run` and `make test`; `make test-slow` is the slow lane CI runs
# after them. Each installs what a fresh machine lacks first (once per interpreter; see STAMP).
PY ?= python3
ARGS ?=
# One stamp per environment (the interpreter's sys.prefix): an install into one Python says nothing of another,
# so `make test PY=.venv/bin/python` after a `make test` with the system's python still installs into the venv.
STAMP := .installed-$(shell $(PY) -c "import hashlib, sys; print(hashlib.sha256(sys.prefix.encode()).hexdigest()[:12])")

.PHONY: run test test-slow bench
$(STAMP): pyproject.toml constraints.txt
	# The CPU wheel of torch first: any other torch spec pulls GBs of CUDA packages.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	# Every dependency at the version CI ran (constraints.txt; cluster.yaml installs the same); the trackers'
	# packages too, which tests/test_tracking.py reads back.
	$(PY) -m pip install -c constraints.txt -e ".[test,tracking]"
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m raysim.cli run $(ARGS)

test: $(STAMP)
	$(PY) -m pytest

# The tests marked slow (pyproject.toml's addopts leaves them out of `make test`).
test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) bench/round_overhead.py
	$(PY) bench/device_overhead.py
	$(PY) bench/population_memory.py
