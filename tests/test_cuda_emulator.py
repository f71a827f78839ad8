"""The CUDA kernels of csrc/cuda on the CPU, through the emulator of csrc/emulator.

The shared grid (test_attention.py) already runs them as the "cuda-emulated" backend. Here: the
emulator itself (its fragment layouts against CuTe's, its launch checks and fault reports) and
the cases the kernels' own paths need: several key tiles, head dims off the instantiated ones,
no keys at all, one query against a long
cache, both causal alignments, a custom scale, a peaked softmax, element offsets above 2^31, the
shared memory of an sm_86 device, and a race mode that shifts warps against each other.
"""
import ctypes
import mmap

import pytest
import torch

import cuda_emulator as emu
from grid import EMULATED_CUDA
from test_attention import check_against_reference, random_inputs

if emu.LIB is None:  # under CI, conftest.py has already failed the run
    pytest.skip(emu.UNAVAILABLE, allow_module_level=True)

DTYPES = [torch.float16, torch.bfloat16]
dtype_ids = lambda d: str(d).removeprefix("torch.")


@pytest.fixture(autouse=True)
def default_settings():
    emu.configure()
    yield
    emu.configure()


# --- the emulator's warp instructions against a second source -------------------------------------

def cute_index(shape, stride, coordinate):
    """Index of a flat coordinate in a CuTe layout (shape, stride), colexicographic like CuTe."""
    if isinstance(shape, int):
        return coordinate * stride
    index = 0
    for sub_shape, sub_stride in zip(shape, stride):
        size = sub_shape if isinstance(sub_shape, int) else torch.Size(_flatten(sub_shape)).numel()
        index += cute_index(sub_shape, sub_stride, coordinate % size)
        coordinate //= size
    return index


def _flatten(shape):
    return [shape] if isinstance(shape, int) else [s for sub in shape for s in _flatten(sub)]


# CuTe's MMA_Traits<SM80_16x8x16_F32F16F16F32_TN> (the bf16 atom has the same layouts): (thread,
# value) -> index into the column-major M x K (A), N x K (B) and M x N (C) tile.
CUTE_MMA = {
    "A": ((((4, 8), (2, 2, 2)), ((32, 1), (16, 8, 128))), 16),
    "B": ((((4, 8), (2, 2)), ((16, 1), (8, 64))), 8),
    "C": ((((4, 8), (2, 2)), ((32, 1), (16, 8))), 16),
}


@pytest.mark.parametrize("operand", ["A", "B", "C"])
def test_mma_fragments_match_cute(operand):
    ((shape, stride), rows) = CUTE_MMA[operand]
    values = 8 if operand == "A" else 4
    for lane in range(32):
        for value in range(values):
            index = cute_index(shape[0], stride[0], lane) + cute_index(shape[1], stride[1], value)
            first, second = index % rows, index // rows  # (m, k) for A, (n, k) for B, (m, n) for C
            expected = (second, first) if operand == "B" else (first, second)  # B as (k, n)
            assert emu.mma_fragment(operand, lane, value) == expected, (operand, lane, value)


# CuTe's Copy_Traits of SM75_U32x4_LDSM_N and SM75_U16x8_LDSM_T, in bits: (thread, value bit) ->
# bit of the source, whose 128-bit rows are the rows the 32 lanes name (matrix = row / 8).
CUTE_LDMATRIX = {
    False: ((32, (32, 4)), (32, (1, 1024))),
    True: (((4, 8), (16, 2, 4)), ((256, 16), (1, 128, 1024))),
}


@pytest.mark.parametrize("transposed", [False, True], ids=["ldmatrix", "ldmatrix.trans"])
def test_ldmatrix_fragments_match_cute(transposed):
    shape, stride = CUTE_LDMATRIX[transposed]
    for lane in range(32):
        for register in range(4):
            for element in range(2):
                bit = cute_index(shape[0], stride[0], lane) + cute_index(shape[1], stride[1], 32 * register + 16 * element)
                matrix, row, col = bit // 1024, bit % 1024 // 128, bit % 128 // 16
                assert matrix == register
                assert emu.ldmatrix_fragment(transposed, lane, element) == (row, col), (lane, register, element)


# --- the emulator's checks and fault reports --------------------------------------------------------

def self_test(which, out=None):
    out = torch.zeros(16, dtype=torch.int16) if out is None else out
    error = emu.LIB.fae_self_test(which, ctypes.c_void_p(out.data_ptr()))
    return error, emu.LIB.fae_last_error().decode(), out


@pytest.mark.parametrize("which,error,message", [
    (0, 4, "hang: no barrier completed"),
    (1, 700, "ldmatrix: shared address 512"),
    (2, 4, "lanes reached different warp collectives"),
    (3, 1, "65536 bytes of dynamic shared memory, but the kernel allows 49152"),
    (4, 9, "2048 threads"),
    (5, 9, "grid \\(1, 70000, 1\\)"),
], ids=["skipped-barrier", "shared-out-of-bounds", "divergent-collective", "no-opt-in", "threads", "grid-y"])
def test_faults_and_limits_are_reported(which, error, message):
    emu.configure(hang_seconds=0.5)
    code, text, _ = self_test(which)
    assert code == error
    assert __import__("re").search(message, text), text


@pytest.mark.parametrize("eager", [False, True], ids=["deferred", "eager"])
def test_poisoned_shared_memory_and_cp_async_timing(eager):
    emu.configure(eager_copies=eager)
    out = torch.zeros(16, dtype=torch.int16)
    out[8:] = torch.arange(1, 9, dtype=torch.int16)
    code, text, out = self_test(6, out)
    assert code == 0, text
    assert out[0].item() == -1  # 0xFFFF: never written
    assert out[1].item() == (1 if eager else -1)  # a deferred copy has not landed before its wait
    assert out[2].item() == 1


def test_shared_memory_beyond_the_device_limit_is_refused():
    emu.LIB.fae_configure(0, 0, 0, 32 * 1024, 60.0)  # a device with 32 KiB per block
    q, k, v, _ = random_inputs((1, 1, 16, 16, 64), torch.float16)
    with pytest.raises(emu.EmulatorError, match="exceed the device's opt-in limit of 32768"):
        emu.forward(q, k, v, False, 0.125)


def test_grid_limits_are_the_hardware_s():
    q, k, v, _ = random_inputs((1, 70000, 1, 1, 16), torch.float16)
    with pytest.raises(emu.EmulatorError, match="grid .* outside the limits"):
        emu.forward(q, k, v, False, 0.25)


# --- the kernels' own paths ---------------------------------------------------------------------------

# (shape (B, H, Nq, Nk, D), causal, softmax_scale), sized by csrc/cuda/tiles.h: the forward and dQ
# kernels take 64 queries per block and 64 keys per stage at head dims up to 128 (fewer above), the
# dK/dV kernel 64 keys per block; instantiated for head dims 64, 128 and 256.
CASES = [
    ((1, 1, 67, 197, 36), True, None),  # Nq < Nk: 4 key tiles, bottom-right diagonal
    ((1, 1, 197, 67, 72), True, None),  # Nq > Nk: the first 130 queries see no key
    ((1, 1, 67, 197, 100), False, None),
    ((1, 1, 33, 70, 200), True, None),
    ((1, 1, 40, 67, 256), False, 0.3),  # a custom scale, forward and backward
    ((1, 1, 1, 300, 64), True, None),  # one decoding step against a long cache
    ((1, 1, 1, 300, 128), False, None),
    ((2, 3, 64, 64, 128), True, 0.05),
]


@pytest.mark.parametrize("shape,causal,scale", CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else None)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_kernel_paths(dtype, shape, causal, scale):
    check_against_reference(EMULATED_CUDA, *random_inputs(shape, dtype), causal, softmax_scale=scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_peaked_softmax(dtype):
    """Scores in the hundreds: the running max must be subtracted before exp2, or it overflows."""
    q, k, v, dout = random_inputs((1, 1, 65, 130, 64), dtype)
    check_against_reference(EMULATED_CUDA, (q.float() * 8).to(dtype), k, v, dout, causal=False)


def test_no_keys():
    q, _, _, dout = random_inputs((1, 2, 5, 1, 64), torch.float16)
    k = v = torch.empty(1, 2, 0, 64, dtype=torch.float16)
    o, lse = emu.forward(q, k, v, False, 0.125)
    assert torch.equal(o, torch.zeros_like(o)) and torch.all(lse == float("-inf"))
    dq, dk, dv = emu.backward(dout, q, k, v, o, lse, False, 0.125)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == dv.shape == k.shape


MAP_NORESERVE = 0x4000  # Linux: back only the pages that are touched


def beyond_2_31(data):
    """`data` copied into a view whose second batch starts past element 2^31 of a sparse buffer."""
    batch, heads, n, head_dim = data.shape
    batch_stride = 2**31 + 128
    size = (batch_stride * (batch - 1) + heads * n * head_dim) * data.element_size()
    buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    flat = torch.frombuffer(buffer, dtype=data.dtype)
    view = flat.as_strided(data.shape, (batch_stride, n * head_dim, head_dim, 1))
    view.copy_(data)
    return view


def test_element_offsets_above_2_31():
    q, k, v, dout = random_inputs((2, 1, 40, 70, 64), torch.bfloat16)
    sparse = [beyond_2_31(t) for t in (q, k, v, dout)]
    assert sparse[0].storage_offset() == 0 and sparse[0].stride(0) > 2**31
    check_against_reference(EMULATED_CUDA, *sparse, causal=True)


def test_every_kernel_fits_an_sm86_device():
    """RTX 30/40, A10, L4 and L40 allow 99 KiB of shared memory per block."""
    emu.configure(device="sm_86")
    for head_dim in (64, 128, 256):
        q, k, v, dout = random_inputs((1, 1, 17, 17, head_dim), torch.float16)
        o, lse = emu.forward(q, k, v, True, 0.1)
        emu.backward(dout, q, k, v, o, lse, True, 0.1)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_results_do_not_depend_on_timing(dtype):
    """Copies landing at once and random per-warp delays: a missing barrier would change the bits."""
    q, k, v, dout = random_inputs((1, 1, 65, 130, 64), dtype)
    calm = emu.forward(q, k, v, True, 0.125)
    calm_grads = emu.backward(dout, q, k, v, *calm, True, 0.125)
    emu.configure(eager_copies=True, delay_seed=7, delay_max_us=300)
    raced = emu.forward(q, k, v, True, 0.125)
    raced_grads = emu.backward(dout, q, k, v, *raced, True, 0.125)
    for a, b in zip(calm + calm_grads, raced + raced_grads):
        assert torch.equal(a, b)
