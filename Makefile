# The two set-up commands of the README: `make run` and `make test`.
# Both install what a fresh machine lacks first (once; see .installed).
PY ?= python3
ARGS ?=

.PHONY: run test bench
.installed: pyproject.toml constraints.txt
	# The CPU wheel of torch first: any other torch spec pulls GBs of CUDA packages.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	# Every dependency at the version CI ran (constraints.txt; cluster.yaml installs the same); the trackers'
	# packages too, which tests/test_tracking.py reads back.
	$(PY) -m pip install -c constraints.txt -e ".[test,tracking]"
	touch .installed

run: .installed
	$(PY) -m raysim.cli run $(ARGS)

test: .installed
	$(PY) -m pytest

bench: .installed
	$(PY) bench/round_overhead.py
	$(PY) bench/device_overhead.py
	$(PY) bench/population_memory.py
