import importlib.util
import os

import pytest
import torch

# Without a GPU, Triton kernels run on the interpreter; it must be chosen before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

GPU = torch.cuda.is_available()


def fix_interpreter_bf16():
    """Make the Triton interpreter's bf16 arithmetic match a GPU's (tests only); two changes.

    - tl.dot: the interpreter stores bf16 tensors as uint16 and hands them to np.matmul as they are, so
      a bf16 dot multiplies raw bit patterns (triton-lang/triton#11584). Converting bf16 operands to
      float32 first, as the interpreter's own cast does, gives the exact products a GPU accumulates in fp32.
    - float32 -> bf16 (``x.to(tl.bfloat16)``): the interpreter truncates the mantissa; a GPU rounds to
      nearest even (cvt.rn.bf16.f32). Truncation's one-sided error is enough to break the 2x rule at small
      head dims.
    """
    import numpy as np
    import triton.language as tl
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    if getattr(InterpreterBuilder.create_dot, "original", None) is not None:
        return
    original_dot, original_cast = InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        a, b = (self.cast_impl(x, tl.float32) if x.dtype.scalar == tl.bfloat16 else x for x in (a, b))
        return original_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return original_cast(self, src, dst_type)
        bits = np.asarray(src.data, dtype=np.float32).view(np.uint32)
        # Add half an ulp of bf16, minus one when the kept bits are even (ties go to even); NaN stays NaN.
        rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        rounded = np.where(np.isnan(src.data), np.uint16(0x7FC0), rounded)
        return TensorHandle(rounded, tl.bfloat16)

    create_dot.original, cast_impl.original = original_dot, original_cast
    InterpreterBuilder.create_dot, InterpreterBuilder.cast_impl = create_dot, cast_impl


def add_interpreter_descriptor_add():
    """Give the Triton interpreter the TMA reduction it lacks (tests only): ``desc.atomic_add(offsets,
    value)``, which the fused-dQ backward issues on sm_90, has no interpreter builder method in triton
    3.9. It adds value to the descriptor's block at offsets, within the descriptor's bounds, as
    ``cp.reduce.async.bulk.tensor`` does; the interpreter runs one program at a time, so no atomics."""
    import triton.language as tl
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle

    if hasattr(InterpreterBuilder, "create_descriptor_reduce"):
        return

    def create_descriptor_reduce(self, kind, desc, value, indices):
        assert kind == ir.DESCRIPTOR_REDUCE_KIND.ADD and value.dtype.scalar == tl.float32, "only float32 adds"
        ptrs, mask = desc.materialize_pointers(indices)
        old = self.create_masked_load(ptrs, mask, None, cache_policy=None, is_volatile=False)
        return self.create_masked_store(ptrs, TensorHandle(old.data + value.data, value.dtype), mask, None)

    InterpreterBuilder.create_descriptor_reduce = create_descriptor_reduce


if os.environ.get("TRITON_INTERPRET") == "1":
    try:
        fix_interpreter_bf16()
        add_interpreter_descriptor_add()
    except ImportError:  # no triton: the Triton tests skip themselves
        pass


def pytest_addoption(parser):
    parser.addoption("--full", action="store_true", help="run the whole shape grid (meant for a GPU)")


def backend_problem(name, device):
    """Why backend `name` cannot run a small float16 call on `device`, or None."""
    import attention

    probe = torch.zeros(1, 1, 1, 16, dtype=torch.float16, device=device)
    reasons = attention.explain(probe, probe, probe, backend=name).passed_over.get(name)
    return "; ".join(reasons) if reasons else None


# What a CI run must have: (what, a check that says why it is missing, or None). Without it, the tests
# of a missing backend skip (test_cpu_backend.py's importorskip) or never reach it, and the run stays
# green while testing less. Append a check here for anything new the suite must not silently lose.
REQUIRED_IN_CI = [
    ("the C++ CPU kernels (attention._C)", lambda: backend_problem("cpu", "cpu")),
    ("the Triton kernels" + ("" if GPU else " on Triton's interpreter"),
     lambda: backend_problem("triton", "cuda" if GPU else "cpu")),
    ("transformers, the fused-attention[transformers] extra (tests/test_transformers_integration.py)",
     lambda: None if importlib.util.find_spec("transformers") else 'not installed: pip install "transformers>=5.0"'),
]
if GPU:
    REQUIRED_IN_CI.append(("the CUDA C++ kernels", lambda: backend_problem("cuda", "cuda")))
else:
    REQUIRED_IN_CI.append(("the CUDA kernels on the emulator (make emulator)",
                           lambda: __import__("cuda_emulator").UNAVAILABLE))


def missing_in_ci():
    """'what: why' for each entry of REQUIRED_IN_CI that is missing here."""
    return [f"{what}: {why}" for what, check in REQUIRED_IN_CI if (why := check()) is not None]


def pytest_sessionstart():
    if os.environ.get("CI", "").lower() not in ("true", "1"):
        return
    missing = missing_in_ci()
    if missing:
        pytest.exit("CI is set, so every backend must be tested, but these are missing:\n  - "
                    + "\n  - ".join(missing), returncode=1)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "compile_gate: compiles every kept Triton config for sm_80 and sm_90 (minutes; no GPU needed)"
    )
