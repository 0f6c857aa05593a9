# The two set-up commands of the README.  torch is installed first, pinned to
# the CPU wheel this machine caches, so nothing pulls CUDA wheels; everything
# else is constrained to constraints.txt, the versions the suite last passed
# with (`make install LOCK=` installs from pyproject.toml's ranges instead).
PYTHON ?= python3
TORCH ?= torch==2.13.0
LOCK ?= constraints.txt
CONSTRAIN = $(if $(LOCK),-c $(LOCK),)

# make test-newest: a separate environment with torch pinned (never unpinned:
# it would pull GBs of CUDA wheels) and the newest release of everything else.
NEWEST_TORCH ?= torch==2.14.1
NEWEST_VENV ?= .newest/venv
NEWEST_WORKERS ?= 2

.PHONY: install demo test test-fast bench lock test-newest docs docs-serve

install:
	$(PYTHON) -m pip install -q $(CONSTRAIN) "$(TORCH)"
	$(PYTHON) -m pip install -q $(CONSTRAIN) -e ".[test]"

demo: install
	$(PYTHON) -m moepass.cli demo

# Two workers (one per core, one intra-op thread each): most of the suite's time
# is dynamo tracing, which is single-threaded Python.
test: install
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

test-fast:
	$(PYTHON) -m pytest -q -n 2 --dist loadfile -m "not inductor and not slow"

# The documentation site (mkdocs.yml, docs/): a strict build into site/ (a broken link, anchor or
# API reference fails it, as in tests/test_docs.py), or served at http://127.0.0.1:8000, rebuilt on edit
# (not strict there: a half-written page shows its warnings in the log instead of stopping the server).
docs: install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict

docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs serve

bench:
	$(PYTHON) benchmarks/moe_block_cpu.py

# Rewrite constraints.txt from this environment (after the suite passed in it).
lock:
	$(PYTHON) tools/lock.py

# Build $(NEWEST_VENV) with the newest releases, run the zoo, make_traceable,
# autograd and export tests there, write notes/compat-newest.md.
test-newest:
	$(PYTHON) tools/newest.py --venv "$(NEWEST_VENV)" --torch "$(NEWEST_TORCH)" --workers $(NEWEST_WORKERS)
