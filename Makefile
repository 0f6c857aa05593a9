# The two set-up commands of the README.  torch is installed first, pinned to
# the CPU wheel this machine caches, so nothing pulls CUDA wheels.
PYTHON ?= python3
TORCH ?= torch==2.13.0

.PHONY: install demo test test-fast bench

install:
	$(PYTHON) -m pip install -q "$(TORCH)"
	$(PYTHON) -m pip install -q -e ".[test]"

demo: install
	$(PYTHON) -m moepass.cli demo

# Two workers (one per core, one intra-op thread each): most of the suite's time
# is dynamo tracing, which is single-threaded Python.
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

test-fast:
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not inductor and not slow"

bench:
	$(PYTHON) benchmarks/moe_block_cpu.py
