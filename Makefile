# The README's two commands: `make bench` (the main job) and `make test`. Both install first.
PYTHON ?= python3
MAX_JOBS ?= 4

.PHONY: install test bench
install:
	$(PYTHON) -m pip install -q -r requirements.txt
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

test: install
	$(PYTHON) -m pytest -q --benchmark-disable

bench: install
	$(PYTHON) -m benchmarks
