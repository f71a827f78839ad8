"""The CUDA kernels of csrc/cuda run on the CPU by the emulator of csrc/emulator, as torch ops.

``make emulator`` builds build/emulator/libcuda_emulator.so from the unchanged kernel sources
(FUSED_ATTENTION_EMULATOR). This module loads it with ctypes, fills the kernels' AttentionParams
from CPU tensors exactly as csrc/cuda/binding.cpp does from CUDA tensors, and registers
``fused_attention_emulated::fwd`` / ``::bwd`` with the same fake implementation and autograd as
the real ops, so the shared test grid runs the emulated kernels like any backend.
"""
import ctypes
import os
import pathlib

import torch

from attention import ops

ROOT = pathlib.Path(__file__).resolve().parents[1]
LIBRARY = pathlib.Path(os.environ.get("FUSED_ATTENTION_EMULATOR_LIB", ROOT / "build/emulator/libcuda_emulator.so"))

# Opt-in dynamic shared memory per block of the devices the kernels target.
MAX_SHARED_BYTES = {"sm_80": 166912, "sm_86": 101376, "sm_89": 101376, "sm_90": 232448}


class StridedTensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("batch_stride", ctypes.c_int64), ("head_stride", ctypes.c_int64),
                ("row_stride", ctypes.c_int64)]


class AttentionParams(ctypes.Structure):  # mirrors csrc/cuda/params.h
    _fields_ = [
        ("q", StridedTensor), ("k", StridedTensor), ("v", StridedTensor), ("o", StridedTensor),
        ("lse", ctypes.c_void_p),
        ("dout", StridedTensor), ("dq", StridedTensor), ("dk", StridedTensor), ("dv", StridedTensor),
        ("delta", ctypes.c_void_p),
        ("batch", ctypes.c_int), ("heads", ctypes.c_int), ("seqlen_q", ctypes.c_int), ("seqlen_k", ctypes.c_int),
        ("head_dim", ctypes.c_int), ("softmax_scale", ctypes.c_float), ("causal", ctypes.c_bool),
        ("element_type", ctypes.c_int),
    ]


def _load():
    if not LIBRARY.exists():
        return None, f"the CUDA emulator is not built ({LIBRARY} missing: run `make emulator`)"
    lib = ctypes.CDLL(str(LIBRARY))
    lib.fae_forward.argtypes = lib.fae_backward.argtypes = [ctypes.POINTER(AttentionParams)]
    lib.fae_last_error.restype = ctypes.c_char_p
    lib.fae_configure.argtypes = [ctypes.c_int, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_longlong, ctypes.c_double]
    lib.fae_mma_fragment.argtypes = [ctypes.c_char, ctypes.c_int, ctypes.c_int] + [ctypes.POINTER(ctypes.c_int)] * 2
    lib.fae_ldmatrix_fragment.argtypes = [ctypes.c_int] * 3 + [ctypes.POINTER(ctypes.c_int)] * 2
    offsets = (ctypes.c_longlong * 16)()
    lib.fae_params_layout(offsets, 16)
    fields = ["q", "o", "lse", "dout", "delta", "batch", "softmax_scale", "causal", "element_type"]
    mirror = [ctypes.sizeof(AttentionParams)] + [getattr(AttentionParams, f).offset for f in fields]
    if list(offsets[: len(mirror)]) != mirror:
        return None, f"AttentionParams mirror is stale: C++ {list(offsets[:len(mirror)])}, Python {mirror}"
    return lib, None


LIB, UNAVAILABLE = _load()


class EmulatorError(RuntimeError):
    pass


def configure(device="sm_80", eager_copies=False, delay_seed=0, delay_max_us=0, hang_seconds=60.0):
    """Settings for the following launches: the emulated device's shared memory limit, when cp.async
    copies land, and the random per-warp delays that expose missing barriers."""
    LIB.fae_configure(int(eager_copies), delay_seed, delay_max_us, MAX_SHARED_BYTES[device], hang_seconds)


def counters():
    values = (ctypes.c_ulonglong * 6)()
    LIB.fae_counters(values)
    return dict(zip(("launches", "blocks", "syncthreads", "mma", "ldmatrix", "cp_async"), values))


def reset_counters():
    LIB.fae_reset_counters()


def mma_fragment(operand, lane, index):
    row, col = ctypes.c_int(), ctypes.c_int()
    LIB.fae_mma_fragment(operand.encode(), lane, index, ctypes.byref(row), ctypes.byref(col))
    return row.value, col.value


def ldmatrix_fragment(transposed, lane, element):
    row, col = ctypes.c_int(), ctypes.c_int()
    LIB.fae_ldmatrix_fragment(int(transposed), lane, element, ctypes.byref(row), ctypes.byref(col))
    return row.value, col.value


def _strided(t):
    return StridedTensor(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


def _params(q, k, v, causal, softmax_scale):
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the CUDA kernels take float16 or bfloat16, got {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu" or (t.size(3) > 1 and t.stride(3) != 1):
            raise ValueError(f"{name} must be a CPU tensor with a contiguous last dim")
    p = AttentionParams()
    p.q, p.k, p.v = _strided(q), _strided(k), _strided(v)
    p.batch, p.heads, p.seqlen_q, p.head_dim = q.shape
    p.seqlen_k = k.shape[2]
    p.softmax_scale = softmax_scale
    p.causal = causal
    p.element_type = 0 if q.dtype == torch.float16 else 1
    return p


def _check(error):
    if error != 0:
        raise EmulatorError(f"cudaError {error}: {LIB.fae_last_error().decode()}")


def _poisoned(shape, dtype):
    """Outputs start as NaN, so an element a kernel never writes shows up."""
    return torch.full(shape, float("nan"), dtype=dtype)


def forward(q, k, v, causal, softmax_scale):
    """(o, lse) of the emulated forward kernel."""
    p = _params(q, k, v, causal, softmax_scale)
    o, lse = _poisoned(q.shape, q.dtype), _poisoned(q.shape[:3], torch.float32)
    p.o, p.lse = _strided(o), lse.data_ptr()
    _check(LIB.fae_forward(ctypes.byref(p)))
    return o, lse


def backward(dout, q, k, v, o, lse, causal, softmax_scale):
    p = _params(q, k, v, causal, softmax_scale)
    dq, dk, dv = (_poisoned(t.shape, t.dtype) for t in (q, k, v))
    delta = _poisoned(q.shape[:3], torch.float32)
    lse = lse.contiguous()
    p.o, p.lse, p.dout = _strided(o), lse.data_ptr(), _strided(dout)
    p.dq, p.dk, p.dv, p.delta = _strided(dq), _strided(dk), _strided(dv), delta.data_ptr()
    _check(LIB.fae_backward(ctypes.byref(p)))
    return dq, dk, dv


if LIB is not None:
    @torch.library.custom_op("fused_attention_emulated::fwd", mutates_args=())
    def emulated_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(q, k, v, causal, softmax_scale)

    @torch.library.custom_op("fused_attention_emulated::bwd", mutates_args=())
    def emulated_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, causal: bool, softmax_scale: float) -> tuple[torch.Tensor, torch.Tensor,
                                                                                          torch.Tensor]:
        return backward(dout, q, k, v, o, lse, causal, softmax_scale)

    ops.register_fused_op("fused_attention_emulated::fwd", "fused_attention_emulated::bwd", emulated_backward)


def flash_attention(q, k, v, causal=False, softmax_scale=None, return_lse=False):
    """attention.flash_attention's contract, on the emulated CUDA kernels."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    fix = lambda t: t if t.size(-1) == 1 or t.stride(-1) == 1 else t.contiguous()
    o, lse = torch.ops.fused_attention_emulated.fwd(fix(q), fix(k), fix(v), causal, scale)
    return (o, lse) if return_lse else o
