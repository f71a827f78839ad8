#!/usr/bin/env bash
# `make gpu-check`: everything a GPU machine can tell us that CI's CPU cannot, in one command.
#
# NEVER RUN YET: written on a machine without a GPU (2026-11-23). Expect the first run to find
# mistakes in this script itself; fix them here, then commit its results.
#
# On a machine with a CUDA GPU, a CUDA build of torch, nvcc and compute-sanitizer (the project's
# H100/H200 image has them; nothing is downloaded: pip runs with --no-deps), it
#   1. builds attention._C with the CUDA kernels for the visible GPU (FUSED_ATTENTION_FORCE_CUDA=1),
#   2. runs the whole test grid on the GPU (pytest --full; CI=true, so every backend, cuda included,
#      must be present),
#   3. runs compute-sanitizer memcheck and racecheck over small odd shapes of the triton and cuda
#      backends, forward and backward, with torch's caching allocator off so that an
#      out-of-bounds access leaves its allocation,
#   4. runs the benchmark suite (python -m benchmarks, bf16: the main grid, then issue 10's
#      grouped-query and varlen cases into gqa-varlen/, then issue 11's score options into options/)
#      and the long-context profiler, plain and with a sliding window (256, 0) into profile-window/,
#      Hugging Face generate on a tiny Llama against "sdpa" (generate.json), and issue 13's decode
#      table (python -m benchmarks.decode into decode/),
# and writes every log, table, JSON and plot under benchmarks/results/<gpu-name-slug>/, ending with
# gpu-check-summary.txt. Each step has a time cap; a failed or timed-out step is recorded and the
# next one still runs; the exit status is non-zero if any failed.
#
# Budget: all steps' caps add up to 34 minutes, more than one call of the lent device allows (10
# minutes a command, 30 minutes a session, and an idle machine is handed back within a minute, so
# every call starts bare and must rebuild). So the steps can be named: `make gpu-check STEPS="tests"`
# runs the build and then only those. Three calls cover the work that matters most in 30 minutes:
#   STEPS="tests"                        build 240 + 330 s
#   STEPS="memcheck racecheck decode"    build 240 + 2 x 120 + 120 s
#   STEPS="benchmarks profile"           build 240 + 210 + 150 s  (gqa-varlen, options, generate and
#                                        profile-window in a later session)
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
STEPS=${STEPS:-tests memcheck racecheck benchmarks gqa-varlen options profile generate profile-window decode}

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu-check: no CUDA GPU visible (torch.cuda.is_available() is False for $PYTHON): run this on a GPU machine" >&2
  exit 1
fi
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
SANITIZER=${SANITIZER:-$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")}
slug=$("$PYTHON" -c 'import torch; from benchmarks.run import device_slug; print(device_slug(torch.device("cuda")))')
out="benchmarks/results/$slug"
mkdir -p "$out"
summary="$out/gpu-check-summary.txt"
: >"$summary"
failed=0

# step NAME SECONDS COMMAND...: runs COMMAND under a time cap, its output to gpu-check-NAME.log,
# if NAME is among $STEPS (the build always runs).
step() {
  local name=$1 limit=$2 start status
  shift 2
  if [ "$name" != build ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
  echo "gpu-check: $name (at most ${limit} s)"
  start=$(date +%s)
  timeout --kill-after=30 "$limit" "$@" >"$out/gpu-check-$name.log" 2>&1
  status=$?
  local verdict=ok
  if [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then verdict="TIMEOUT after ${limit} s"; fi
  if [ "$status" -ne 0 ] && [ "$verdict" = ok ]; then verdict="FAILED (exit $status)"; fi
  [ "$verdict" = ok ] || failed=1
  printf '%-10s %-26s %5d s   %s\n' "$name" "$verdict" "$(( $(date +%s) - start ))" "$out/gpu-check-$name.log" | tee -a "$summary"
  return "$status"
}

{
  date -u
  nvidia-smi
  "$PYTHON" -c 'import torch, triton; print("torch", torch.__version__, "CUDA", torch.version.cuda, "triton", triton.__version__)'
  "$CUDA_HOME/bin/nvcc" --version
} >"$out/gpu-check-environment.log" 2>&1

# -v: setup.py prints which kernels it builds, for which targets.
if ! step build 240 env FUSED_ATTENTION_FORCE_CUDA=1 MAX_JOBS="$(nproc)" \
    "$PYTHON" -m pip install -v --no-build-isolation --no-deps -e .; then
  echo "gpu-check: the build failed, nothing else can run: see $out/gpu-check-build.log" >&2
  exit 1
fi

# test_cuda_compile.py is left out: the build step has just compiled every kernel with nvcc.
step tests 330 env CI=true "$PYTHON" -m pytest tests --full -q -p no:cacheprovider --benchmark-disable \
  --ignore=tests/test_cuda_compile.py

# Small odd shapes: partial tiles everywhere, head dims padded to 64/128/256, Nq != Nk both ways,
# rows that see no key, a 2-byte-misaligned view (the element-wise copy path), fp16 and bf16.
driver=$(mktemp --suffix=.py)
trap 'rm -f "$driver"' EXIT
cat >"$driver" <<'EOF'
import torch

import attention

torch.manual_seed(0)
SHAPES = [(1, 2, 17, 33, 40), (2, 1, 65, 17, 72), (1, 1, 1, 130, 100), (1, 1, 33, 33, 200)]  # (B, H, Nq, Nk, d)
for backend in ("triton", "cuda"):
    for dtype in (torch.float16, torch.bfloat16):
        for b, h, n_q, n_k, d in SHAPES:
            for causal in (False, True):
                storage = torch.randn(b, h, n_q + 2 * n_k, d + 1, device="cuda", dtype=dtype)
                q, k, v = (x[..., 1:] for x in storage.split([n_q, n_k, n_k], dim=2))  # misaligned views
                q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
                o = attention.flash_attention(q, k, v, causal=causal, backend=backend)
                o.backward(torch.randn_like(o))
                ref = attention.naive_attention(q.detach(), k.detach(), v.detach(), causal=causal, upcast=True)
                err = (o.float() - ref).abs().max().item()
                assert err < 0.1, f"{backend} {dtype} {(b, h, n_q, n_k, d)} causal={causal}: max error {err}"
torch.cuda.synchronize()
print(f"{2 * 2 * len(SHAPES) * 2} cases per backend, forward and backward: done")
EOF
for tool in memcheck racecheck; do
  step "$tool" 120 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" --error-exitcode 1 --target-processes all "$PYTHON" "$driver"
done

step benchmarks 210 "$PYTHON" -m benchmarks --cases grid --dtypes bf16 --no-progress --out "$out"
# A step of their own, so that a timeout here cannot cost the grid's results (written at the end).
step gqa-varlen 180 "$PYTHON" -m benchmarks --cases gqa,varlen --dtypes bf16 --no-progress --out "$out/gqa-varlen"
step options 180 "$PYTHON" -m benchmarks --cases options --dtypes bf16 --no-progress --out "$out/options"
step profile 150 "$PYTHON" -m benchmarks.profile --time-limit 5 --ours-time-limit 15 --no-progress --out "$out"
# A fixed window: our time should grow as N (fitted exponent about 1), the baselines' as N^2.
# Hugging Face generate on a tiny Llama, ours against "sdpa" (needs transformers on the machine).
step generate 120 "$PYTHON" -m benchmarks.generate --json "$out/generate.json"
step profile-window 180 "$PYTHON" -m benchmarks.profile --window 256 --time-limit 5 --ours-time-limit 15 \
  --no-progress --out "$out/profile-window"
# Decoding from a KV cache: ours split and unsplit against SDPA's backends, K/V GB/s against the peak.
step decode 120 "$PYTHON" -m benchmarks.decode --out "$out/decode"

echo "gpu-check: results in $out; summary:"
cat "$summary"
exit "$failed"
