# The README's two commands: `make bench` (the main job) and `make test`. Both install first.
# `make emulator` and `make cuda-build` (CI, no GPU needed) and `make gpu-check` (a GPU machine)
# check the CUDA path.
PYTHON ?= python3
MAX_JOBS ?= 4

.PHONY: install test bench emulator cuda-build gpu-check
install:
	$(PYTHON) -m pip install -q -r requirements.txt
	MAX_JOBS=$(MAX_JOBS) $(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .

test: install emulator
	$(PYTHON) -m pytest -q --benchmark-disable --durations=40

# Runs go to benchmarks/runs/<device>-<time>/ unless OUT names a folder (committed results: a deliberate act).
bench: install
	$(PYTHON) -m benchmarks $(if $(OUT),--out $(OUT))

# The CUDA kernels of csrc/cuda compiled as host C++ against the emulator of csrc/emulator (see
# tests/cuda_emulator.py): no GPU and no CUDA toolkit needed.
EMULATOR_DIR := build/emulator
EMULATOR_FLAGS := -std=c++20 -O2 -fPIC -pthread -fno-strict-aliasing -Wall -Wno-unknown-pragmas \
	-DFUSED_ATTENTION_EMULATOR -Icsrc/emulator/include
EMULATOR_OBJECTS := $(addprefix $(EMULATOR_DIR)/,flash_fwd.o flash_bwd.o flash_decode.o execution.o instructions.o c_api.o self_test.o)
EMULATOR_HEADERS := $(wildcard csrc/cuda/*.cuh csrc/cuda/*.h csrc/emulator/*.h csrc/emulator/include/*.h)

emulator: $(EMULATOR_DIR)/libcuda_emulator.so

$(EMULATOR_DIR)/libcuda_emulator.so: $(EMULATOR_OBJECTS)
	$(CXX) -shared -pthread $^ -o $@

$(EMULATOR_DIR)/%.o: csrc/cuda/%.cu $(EMULATOR_HEADERS) | $(EMULATOR_DIR)
	$(CXX) $(EMULATOR_FLAGS) -x c++ -c $< -o $@

$(EMULATOR_DIR)/%.o: csrc/emulator/%.cpp $(EMULATOR_HEADERS) | $(EMULATOR_DIR)
	$(CXX) $(EMULATOR_FLAGS) -c $< -o $@

$(EMULATOR_DIR):
	mkdir -p $@

# The CUDA kernels built against the CUDA build of torch in a fresh venv of its own, and imported.
cuda-build:
	MAX_JOBS=$(MAX_JOBS) bash .ci/cuda_build.sh

# Build, full test grid, compute-sanitizer, benchmarks and profiler, into benchmarks/results/<gpu>/.
gpu-check:
	PYTHON=$(PYTHON) $(if $(STEPS),STEPS="$(STEPS)") bash benchmarks/gpu_check.sh
