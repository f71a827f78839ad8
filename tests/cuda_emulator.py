"""The CUDA kernels of csrc/cuda run on the CPU by the emulator of csrc/emulator, as torch ops.

``make emulator`` builds build/emulator/libcuda_emulator.so from the unchanged kernel sources
(FUSED_ATTENTION_EMULATOR). This module loads it with ctypes, fills the kernels' AttentionParams
from CPU tensors exactly as csrc/cuda/binding.cpp does from CUDA tensors, and registers
``fused_attention_emulated::fwd`` / ``::bwd`` with the same fake implementation and autograd as
the real ops, so the shared test grid runs the emulated kernels like any backend.
"""
import ctypes
import math
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
        ("lse", ctypes.c_void_p), ("lse_head_stride", ctypes.c_int64),
        ("dout", StridedTensor), ("dq", StridedTensor), ("dk", StridedTensor), ("dv", StridedTensor),
        ("delta", ctypes.c_void_p),
        ("key_padding_mask", ctypes.c_void_p), ("key_padding_mask_batch_stride", ctypes.c_int64),
        ("cu_seqlens_q", ctypes.c_void_p), ("cu_seqlens_k", ctypes.c_void_p),
        ("batch", ctypes.c_int), ("heads", ctypes.c_int), ("group", ctypes.c_int), ("seqlen_q", ctypes.c_int),
        ("seqlen_k", ctypes.c_int), ("head_dim", ctypes.c_int), ("softmax_scale", ctypes.c_float),
        ("causal", ctypes.c_bool), ("element_type", ctypes.c_int),
        ("window_left", ctypes.c_int), ("window_right", ctypes.c_int), ("softcap", ctypes.c_float),
        ("alibi_slopes", ctypes.c_void_p), ("dropout_keep_threshold", ctypes.c_uint32),
        ("dropout_scale", ctypes.c_float), ("dropout_seed", ctypes.c_uint64), ("dropout_offset", ctypes.c_uint32),
    ]


class DecodeParams(ctypes.Structure):  # mirrors csrc/cuda/params.h
    _fields_ = [
        ("q", StridedTensor), ("k_cache", StridedTensor), ("v_cache", StridedTensor),
        ("seqlens_k", ctypes.c_void_p), ("block_table", ctypes.c_void_p), ("max_blocks", ctypes.c_int),
        ("block_size", ctypes.c_int), ("o_parts", ctypes.c_void_p), ("lse_parts", ctypes.c_void_p),
        ("batch", ctypes.c_int), ("heads", ctypes.c_int), ("group", ctypes.c_int), ("seqlen_q", ctypes.c_int),
        ("head_dim", ctypes.c_int), ("num_splits", ctypes.c_int), ("softmax_scale", ctypes.c_float),
        ("causal", ctypes.c_bool), ("element_type", ctypes.c_int), ("window_left", ctypes.c_int),
        ("window_right", ctypes.c_int), ("softcap", ctypes.c_float), ("alibi_slopes", ctypes.c_void_p),
    ]


def _stale_mirror(structure, layout_function, fields):
    """Why the ctypes mirror of a C++ struct disagrees with the library's sizeof and offsets, or None."""
    offsets = (ctypes.c_longlong * 32)()
    layout_function(offsets, 32)
    mirror = [ctypes.sizeof(structure)] + [getattr(structure, f).offset for f in fields]
    if list(offsets[: len(mirror)]) != mirror:
        return f"{structure.__name__} mirror is stale: C++ {list(offsets[:len(mirror)])}, Python {mirror}"
    return None


def _load():
    if not LIBRARY.exists():
        return None, f"the CUDA emulator is not built ({LIBRARY} missing: run `make emulator`)"
    lib = ctypes.CDLL(str(LIBRARY))
    lib.fae_forward.argtypes = lib.fae_backward.argtypes = [ctypes.POINTER(AttentionParams)]
    lib.fae_decode.argtypes = [ctypes.POINTER(DecodeParams)]
    lib.fae_last_error.restype = ctypes.c_char_p
    lib.fae_configure.argtypes = [ctypes.c_int, ctypes.c_ulonglong, ctypes.c_int, ctypes.c_longlong, ctypes.c_double]
    lib.fae_mma_fragment.argtypes = [ctypes.c_char, ctypes.c_int, ctypes.c_int] + [ctypes.POINTER(ctypes.c_int)] * 2
    lib.fae_ldmatrix_fragment.argtypes = [ctypes.c_int] * 3 + [ctypes.POINTER(ctypes.c_int)] * 2
    lib.fae_philox.argtypes = [ctypes.POINTER(ctypes.c_uint32)] * 3
    fields = ["q", "o", "lse", "lse_head_stride", "dout", "delta", "key_padding_mask", "cu_seqlens_q", "batch",
              "group", "softmax_scale", "causal", "element_type", "window_left", "softcap", "alibi_slopes",
              "dropout_keep_threshold", "dropout_scale", "dropout_seed", "dropout_offset"]
    decode_fields = ["k_cache", "seqlens_k", "max_blocks", "o_parts", "batch", "softmax_scale", "causal",
                     "element_type", "window_left", "softcap", "alibi_slopes"]
    stale = (_stale_mirror(AttentionParams, lib.fae_params_layout, fields)
             or _stale_mirror(DecodeParams, lib.fae_decode_params_layout, decode_fields))
    if stale:
        return None, stale
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


def philox(counter, key):
    """The four words of the kernels' Philox4x32-10 (csrc/cuda/philox.cuh) for counter (c0..c3) and key (k0, k1)."""
    words = (ctypes.c_uint32 * 4)()
    LIB.fae_philox((ctypes.c_uint32 * 4)(*counter), (ctypes.c_uint32 * 2)(*key), words)
    return tuple(words)


def _strided(t):
    return StridedTensor(t.data_ptr(), t.stride(0), t.stride(1), t.stride(2))


INT_MAX = 2**31 - 1


def _set_score_options(p, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset):
    """binding.cpp's set_score_options: SPEC11's options as params.h holds them."""
    if alibi_slopes is not None and (alibi_slopes.dtype != torch.float32 or alibi_slopes.shape != (p.batch, p.heads)
                                     or not alibi_slopes.is_contiguous()):
        raise ValueError(f"alibi_slopes must be contiguous float32 {(p.batch, p.heads)}")
    p.window_left, p.window_right = min(window_left, INT_MAX), min(window_right, INT_MAX)
    p.softcap = softcap
    p.alibi_slopes = None if alibi_slopes is None else alibi_slopes.data_ptr()
    p.dropout_keep_threshold = math.floor(dropout_p * 2.0**32)  # in double, as SPEC11 says
    p.dropout_scale = 1.0 / (1.0 - dropout_p)
    p.dropout_seed, p.dropout_offset = dropout_seed, dropout_offset


def _params(q, k, v, causal, softmax_scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            *score_options):
    """What binding.cpp fills from tensors, for dense calls (cu_seqlens None) and varlen ones; score_options are
    SPEC11's (window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset)."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the CUDA kernels take float16 or bfloat16, got {q.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.device.type != "cpu" or (t.size(3) > 1 and t.stride(3) != 1):
            raise ValueError(f"{name} must be a CPU tensor with a contiguous last dim")
    if q.size(1) % k.size(1):
        raise ValueError(f"q heads ({q.size(1)}) must be a multiple of k heads ({k.size(1)})")
    p = AttentionParams()
    p.q, p.k, p.v = _strided(q), _strided(k), _strided(v)
    p.heads, p.group, p.head_dim = q.size(1), q.size(1) // k.size(1), q.size(3)
    p.lse_head_stride = q.size(2)
    p.softmax_scale = softmax_scale
    p.causal = causal
    p.element_type = 0 if q.dtype == torch.float16 else 1
    if cu_seqlens_q is None:
        p.batch, p.seqlen_q, p.seqlen_k = q.size(0), q.size(2), k.size(2)
        if key_padding_mask is not None:
            if key_padding_mask.dtype != torch.bool or key_padding_mask.shape != (q.size(0), k.size(2)):
                raise ValueError(f"key_padding_mask must be bool {(q.size(0), k.size(2))}")
            p.key_padding_mask = key_padding_mask.data_ptr()
            p.key_padding_mask_batch_stride = key_padding_mask.stride(0)
    else:
        for name, t in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
                raise ValueError(f"{name} must be a contiguous int32 vector")
        p.batch, p.seqlen_q, p.seqlen_k = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
        p.cu_seqlens_q, p.cu_seqlens_k = cu_seqlens_q.data_ptr(), cu_seqlens_k.data_ptr()
    _set_score_options(p, *score_options)
    return p


def _check(error):
    if error != 0:
        raise EmulatorError(f"cudaError {error}: {LIB.fae_last_error().decode()}")


def _poisoned(shape, dtype):
    """Outputs start as NaN, so an element a kernel never writes shows up."""
    return torch.full(shape, float("nan"), dtype=dtype)


def _poisoned_like_rows(t, varlen):
    """An output shaped like q, k or v: dense, contiguous; varlen, the (1, H, total, D) view of a
    contiguous (total, H, D) tensor, as SPEC10 lays out packed sequences."""
    if not varlen:
        return _poisoned(t.shape, t.dtype)
    _, heads, total, head_dim = t.shape
    return _poisoned((total, heads, head_dim), t.dtype).transpose(0, 1).unsqueeze(0)


def score_options(causal, window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=0,
                  dropout_offset=0):
    """SPEC11's op arguments from `window_left` to `dropout_offset` for the public API's options (causal passed
    as the right bound 0)."""
    left, right = window
    return left, 0 if causal else right, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset


def forward(q, k, v, causal, softmax_scale, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=0, max_seqlen_k=0, *options):
    """(o, lse) of the emulated forward kernel. options: the op's, from window_left to dropout_offset; none
    given, those of score_options(causal)."""
    p = _params(q, k, v, causal, softmax_scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, *(options or score_options(causal)))
    o, lse = _poisoned_like_rows(q, cu_seqlens_q is not None), _poisoned(q.shape[:3], torch.float32)
    p.o, p.lse = _strided(o), lse.data_ptr()
    _check(LIB.fae_forward(ctypes.byref(p)))
    return o, lse


def backward(dout, q, k, v, o, lse, causal, softmax_scale, key_padding_mask=None, cu_seqlens_q=None,
             cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, *options):
    """(dq, dk, dv) of the emulated backward kernels; options as forward's."""
    p = _params(q, k, v, causal, softmax_scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                max_seqlen_k, *(options or score_options(causal)))
    varlen = cu_seqlens_q is not None
    dq, dk, dv = (_poisoned_like_rows(t, varlen) for t in (q, k, v))
    delta = _poisoned(q.shape[:3], torch.float32)
    lse = lse.contiguous()
    p.o, p.lse, p.dout = _strided(o), lse.data_ptr(), _strided(dout)
    p.dq, p.dk, p.dv, p.delta = _strided(dq), _strided(dk), _strided(dv), delta.data_ptr()
    _check(LIB.fae_backward(ctypes.byref(p)))
    return dq, dk, dv


def decode(q, k_cache, v_cache, seqlens_k, block_table, causal, softmax_scale, window_left, window_right, softcap,
           alibi_slopes, num_splits):
    """(o_parts, lse_parts) of the emulated decode kernel: what binding.cpp's fwd_kvcache fills and launches."""
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the CUDA kernels take float16 or bfloat16, got {q.dtype}")
    p = DecodeParams()
    p.q, p.k_cache, p.v_cache = _strided(q), _strided(k_cache), _strided(v_cache)
    p.seqlens_k = seqlens_k.data_ptr()
    if block_table is not None:
        p.block_table, p.max_blocks, p.block_size = block_table.data_ptr(), block_table.size(1), k_cache.size(2)
    p.batch, p.heads, p.seqlen_q, p.head_dim = q.size(0), q.size(1), q.size(2), q.size(3)
    p.group, p.num_splits = q.size(1) // k_cache.size(1), num_splits
    p.softmax_scale, p.causal, p.element_type = softmax_scale, causal, 0 if q.dtype == torch.float16 else 1
    p.window_left, p.window_right = min(window_left, INT_MAX), min(window_right, INT_MAX)
    p.softcap = softcap
    p.alibi_slopes = None if alibi_slopes is None else alibi_slopes.data_ptr()
    o_parts = _poisoned((num_splits, *q.shape), torch.float32)
    lse_parts = _poisoned((num_splits, *q.shape[:3]), torch.float32)
    p.o_parts, p.lse_parts = o_parts.data_ptr(), lse_parts.data_ptr()
    _check(LIB.fae_decode(ctypes.byref(p)))
    return o_parts, lse_parts


if LIB is not None:
    @torch.library.custom_op("fused_attention_emulated::fwd_kvcache", mutates_args=())
    def emulated_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, seqlens_k: torch.Tensor,
                        block_table: torch.Tensor | None, causal: bool, softmax_scale: float, window_left: int,
                        window_right: int, softcap: float, alibi_slopes: torch.Tensor | None,
                        num_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
        return decode(q, k_cache, v_cache, seqlens_k, block_table, causal, softmax_scale, window_left, window_right,
                      softcap, alibi_slopes, num_splits)

    torch.library.register_fake("fused_attention_emulated::fwd_kvcache")(ops._fake_decode)

    @torch.library.custom_op("fused_attention_emulated::fwd", mutates_args=())
    def emulated_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float,
                         key_padding_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                         cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, window_left: int,
                         window_right: int, softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float,
                         dropout_seed: int, dropout_offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        return forward(q, k, v, causal, softmax_scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                       max_seqlen_k, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed,
                       dropout_offset)

    @torch.library.custom_op("fused_attention_emulated::bwd", mutates_args=())
    def emulated_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, causal: bool, softmax_scale: float,
                          key_padding_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                          cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, window_left: int,
                          window_right: int, softcap: float, alibi_slopes: torch.Tensor | None, dropout_p: float,
                          dropout_seed: int,
                          dropout_offset: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return backward(dout, q, k, v, o, lse, causal, softmax_scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                        max_seqlen_q, max_seqlen_k, window_left, window_right, softcap, alibi_slopes, dropout_p,
                        dropout_seed, dropout_offset)

    ops.register_fused_op("fused_attention_emulated::fwd", "fused_attention_emulated::bwd", emulated_backward)
