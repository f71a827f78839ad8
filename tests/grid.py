"""The shared test grid and the tolerance rule every backend is held to."""
import os

import pytest
import torch

import attention
import cuda_emulator
from attention.backends import fused_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
# The CUDA kernels run on the CPU by csrc/emulator, a backend of the test grid only.
EMULATED_CUDA = "cuda-emulated"

# (batch, heads, Nq, Nk, head_dim): odd lengths, Nq != Nk both ways, head dims beyond powers of two.
SMALL_SHAPES = [
    (1, 1, 1, 1, 16),
    (2, 3, 17, 17, 40),
    (1, 2, 17, 40, 64),
    (1, 2, 40, 17, 32),
    (1, 1, 113, 31, 80),
    (1, 1, 97, 203, 64),  # several query and key tiles in every backend
]
FULL_SHAPES = SMALL_SHAPES + [
    (1, 2, 2, 127, 96),
    (1, 1, 127, 2, 112),
    (2, 2, 1023, 1023, 64),
    (1, 2, 1025, 1023, 128),
    (1, 1, 1023, 1025, 160),
    (1, 1, 257, 513, 192),
    (1, 1, 255, 129, 256),
]


def backends_under_test():
    """The fused backends this machine can run (the naive one is the reference, tested on its own)."""
    backends = [b for b in attention.available_backends(DEVICE) if b != "naive"]
    if DEVICE == "cpu" and cuda_emulator.LIB is not None:
        backends.append(EMULATED_CUDA)
    return backends


def _backend(name):
    """A backend name for the public API; the emulated CUDA kernels as a Backend of their own."""
    if name != EMULATED_CUDA:
        return name
    takes = (torch.float16, torch.bfloat16)
    emulated = torch.ops.fused_attention_emulated
    return fused_backend(EMULATED_CUDA, emulated.fwd,
                         lambda q, k, v, options: [] if q.dtype in takes else [f"float16 or bfloat16, not {q.dtype}"],
                         backward_op=emulated.bwd, decode_op=lambda *args: emulated.fwd_kvcache(*args))


def flash_attention(q, k, v, backend, **options):
    """attention.flash_attention on `backend`, the emulated CUDA kernels included."""
    return attention.flash_attention(q, k, v, backend=_backend(backend), **options)


def flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, backend, **options):
    """attention.flash_attention_with_kvcache on `backend`, the emulated CUDA kernels included."""
    return attention.flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, backend=_backend(backend),
                                                  **options)


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, backend, **options):
    """attention.flash_attention_varlen on `backend`, the emulated CUDA kernels included."""
    return attention.flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            backend=_backend(backend), **options)


def dtypes_for(backend):
    if backend == "triton" and INTERPRETED:
        return [torch.float16, torch.bfloat16, torch.float32]  # bf16: conftest fixes the interpreter's dot
    if backend in ("cuda", EMULATED_CUDA):
        return [torch.float16, torch.bfloat16]
    if DEVICE == "cuda":
        return [torch.float16, torch.bfloat16]
    return [torch.float32, torch.bfloat16, torch.float16]


def shapes_for(backend, full):
    if backend == "triton" and INTERPRETED:
        return SMALL_SHAPES
    return FULL_SHAPES if full or backend == "cpu" else SMALL_SHAPES


def case_grid(full, with_shapes=True):
    cases = []
    for backend in backends_under_test():
        for dtype in dtypes_for(backend):
            dtype_id = str(dtype).removeprefix("torch.")
            if not with_shapes:
                cases.append(pytest.param(backend, dtype, id=f"{backend}-{dtype_id}"))
                continue
            for shape in shapes_for(backend, full):
                shape_id = "x".join(map(str, shape))
                cases.append(pytest.param(backend, dtype, shape, id=f"{backend}-{dtype_id}-{shape_id}"))
    return cases


def poison_allocator():
    """Fill freed GPU memory with NaN so an output element a kernel forgets to write shows up."""
    if DEVICE == "cuda":
        torch.full((1 << 26,), float("nan"), device=DEVICE)
        # the block returns to torch's caching allocator and backs the next outputs


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_within_rule(name, ours, ref, lowprec, factor):
    """max|ours - ref| <= factor * max|lowprec - ref| + 1e-5 (the rule of flash-attention's tests)."""
    assert ours.shape == ref.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    assert not ours.isnan().any(), f"{name}: NaN in output"
    err, base = max_err(ours, ref), max_err(lowprec, ref)
    assert err <= factor * base + 1e-5, f"{name}: error {err:.3g} > {factor} x torch's {base:.3g} + 1e-5"
