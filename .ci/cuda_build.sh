#!/usr/bin/env bash
# CI, no GPU: build attention._C with the CUDA kernels the way a user's `pip install` on a GPU box
# does (the CUDA build of torch, default targets sm_80, sm_90 and compute_90 PTX), import it, and
# check that fused_attention::fwd/bwd have CUDA kernels. Everything happens in a fresh venv and a
# copy of the tree under a temp dir: nothing is cached between runs, and the CPU build that
# `make test` uses in this tree is left alone. Measured on 2 cores shared with other builds
# (load average 9-20): venv 2.3 min, header check 0.8, compile 6.4, import check 1.2: 10.7 min in
# all, 4.7 min of CPU time (18.7 min at load average 40-80).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_CUDA_VERSION=${TORCH_CUDA_VERSION:-2.14.1}  # CUDA 13 build, on this machine's disk
# /usr/local/bin/nvcc is a wrapper script, from which torch would guess CUDA_HOME=/usr/local.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export MAX_JOBS=${MAX_JOBS:-2}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
step() { echo "cuda-build: $* ($(date -u +%H:%M:%S))"; }

step "fresh venv with torch==$TORCH_CUDA_VERSION"
python3 -m venv "$work/venv"
py="$work/venv/bin/python"
# --no-compile: no .pyc for the thousands of modules of torch that the check never imports
"$py" -m pip install -q --no-compile "torch==$TORCH_CUDA_VERSION" setuptools ninja
"$py" -c 'import torch; assert torch.version.cuda, f"torch {torch.__version__} is not a CUDA build"'

step "setup.py's header list against the headers torch's CUDA headers open"
"$py" .ci/torch_cuda_headers.py

step "build (MAX_JOBS=$MAX_JOBS)"
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$work/src"
start=$(date +%s)
# FORCE: a CUDA build of torch and a toolkit are here, so any reason to fall back is an error.
FUSED_ATTENTION_FORCE_CUDA=1 "$py" -m pip install -q --no-build-isolation --no-deps "$work/src"
step "built in $(( $(date +%s) - start )) s"

step "import and check the CUDA dispatch keys"
cd "$work"  # import the installed package, not the source tree
"$py" - <<'EOF'
import torch

import attention
from attention import backends

for op in ("fused_attention::fwd", "fused_attention::bwd"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA"), f"{op} has no CUDA kernel"
targets = torch.ops.fused_attention.cuda_targets()
assert set(targets.split(",")) == {"sm_80", "sm_90", "compute_90"}, targets
smem = {(d, b): torch.ops.fused_attention.cuda_shared_memory_bytes(d, b) for d in (64, 128, 256) for b in (False, True)}
assert all(0 < n <= 227 * 1024 for n in smem.values()), smem
assert "cuda" not in attention.available_backends("cpu")
print(f"attention._C: CUDA kernels for {targets}; dynamic shared memory per block (head dim, backward): {smem}")
print(f"on a GPU of capability 12.0: {backends.cuda_image_problem((12, 0), targets) or 'runs the PTX'}")
EOF
