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

test: install
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not inductor and not slow"

bench:
	$(PYTHON) benchmarks/moe_block_cpu.py
