# The README's two commands: `make bench` (the main job) and `make test`. Both install first.
# `make cuda-build` (CI, no GPU needed) and `make gpu-check` (a GPU machine) check the CUDA path.
PYTHON ?= python3
MAX_JOBS ?= 4

.PHONY: install test bench cuda-build gpu-check
install:
	$(PYTHON) -m pip install -q -r requirements.txt
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

test: install
	$(PYTHON) -m pytest -q --benchmark-disable

bench: install
	$(PYTHON) -m benchmarks

# The CUDA kernels built against the CUDA build of torch in a fresh venv of its own, and imported.
cuda-build:
	MAX_JOBS=$(MAX_JOBS) bash .ci/cuda_build.sh

# Build, full test grid, compute-sanitizer, benchmarks and profiler, into benchmarks/results/<gpu>/.
gpu-check:
	PYTHON=$(PYTHON) bash benchmarks/gpu_check.sh
