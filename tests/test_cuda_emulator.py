"""The CUDA kernels of csrc/cuda on the CPU, through the emulator of csrc/emulator.

The shared grid (test_attention.py) already runs them as the "cuda-emulated" backend. Here: the
emulator itself (its fragment layouts against CuTe's, its launch checks and fault reports) and
the cases the kernels' own paths need: several key tiles, head dims off the instantiated ones,
no keys at all, one query against a long
cache, both causal alignments, a custom scale, a peaked softmax, element offsets above 2^31, the
shared memory of an sm_86 device, and a race mode that shifts warps against each other. For the
score modifiers (SPEC11): windows over several tiles of every kernel, their cost linear in N, the
Philox generator and the dropout keep-mask bit for bit, softcap, ALiBi and dropout at every head dim.
"""
import ctypes
import mmap

import pytest
import torch

import attention
import attention.merge
import attention.reference
import cuda_emulator as emu
from attention.dropout import philox4x32
from attention.reference import naive_attention_varlen
from grid import EMULATED_CUDA, assert_within_rule, flash_attention_varlen
from test_attention import alibi_slopes, check, check_against_reference, check_with_dropout, random_inputs

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


# --- grouped-query heads, key padding and packed sequences (SPEC10) -----------------------------------

def reference(q, k, v, causal, scale, key_padding_mask=None):
    """(o, lse) in plain torch: k and v expanded to q's heads, hidden scores -inf, and a row that
    sees no key giving o = 0, lse = -inf and no gradient."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    n_q, n_k = q.size(2), k.size(2)
    scores = q @ k.transpose(-1, -2) * scale
    hidden = torch.zeros(n_q, n_k, dtype=torch.bool)
    if causal:
        hidden = torch.ones(n_q, n_k, dtype=torch.bool).triu(n_k - n_q + 1)
    hidden = hidden.expand(q.size(0), 1, n_q, n_k)
    if key_padding_mask is not None:
        hidden = hidden | ~key_padding_mask[:, None, None, :]
    scores = scores.masked_fill(hidden, float("-inf"))
    row_max = scores.amax(-1, keepdim=True).detach() if n_k else scores.new_zeros(*scores.shape[:3], 1)
    row_max = row_max.masked_fill(row_max.isneginf(), 0)
    p = torch.exp(scores - row_max)
    row_sum = p.sum(-1, keepdim=True)
    o = (p @ v) / row_sum.clamp_min(torch.finfo(row_sum.dtype).tiny)
    return o, (row_max + row_sum.log()).squeeze(-1).float()


def reference_varlen(q, k, v, causal, scale, cu_q, cu_k):
    """The packed (1, H, total, D) views attended sequence by sequence."""
    outputs, lses = [], []
    for b in range(cu_q.numel() - 1):
        rows_q, rows_k = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        o, lse = reference(q[:, :, rows_q], k[:, :, rows_k], v[:, :, rows_k], causal, scale)
        outputs.append(o)
        lses.append(lse)
    return torch.cat(outputs, 2), torch.cat(lses, 2)


def reference_run(q, k, v, dout, dtype, **options):
    """Output, lse and gradients of `reference` (or reference_varlen with cu_q/cu_k) in `dtype`."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    attend = reference_varlen if "cu_q" in options else reference
    o, lse = attend(q, k, v, **options)
    o.backward(dout.to(dtype))
    return o, lse, q.grad, k.grad, v.grad


def check_options_against_reference(q, k, v, dout, causal, key_padding_mask=None, cu_seqlens=None, max_seqlen=(0, 0)):
    """Our (o, lse, dq, dk, dv) against the float64 reference by the 2x/3x rule, the rule's base
    being the reference run in q's dtype."""
    scale = q.size(-1) ** -0.5
    cu_q, cu_k = cu_seqlens or (None, None)
    options = (key_padding_mask, cu_q, cu_k, *max_seqlen)
    o, lse = emu.forward(q, k, v, causal, scale, *options)
    grads = emu.backward(dout, q, k, v, o, lse, causal, scale, *options)
    ref_options = dict(causal=causal, scale=scale)
    ref_options.update(dict(cu_q=cu_q, cu_k=cu_k) if cu_seqlens else dict(key_padding_mask=key_padding_mask))
    ref = reference_run(q, k, v, dout, torch.float64, **ref_options)
    lowprec = reference_run(q, k, v, dout, q.dtype, **ref_options)
    hidden = ref[1].isinf()
    assert torch.equal(lse.isneginf(), hidden), "lse must be -inf exactly on rows that see no key"
    assert_within_rule("lse", lse[~hidden], ref[1][~hidden], lowprec[1][~hidden], 2)
    for name, factor, ours, r, lp in zip(("o", "dq", "dk", "dv"), (2, 3, 3, 3), (o, *grads), ref[:1] + ref[2:],
                                         lowprec[:1] + lowprec[2:]):
        assert_within_rule(name, ours, r, lp, factor)
    # A row that sees no key: exactly zero output and query gradient.
    assert torch.all(o.transpose(1, 2)[hidden.transpose(1, 2)] == 0)
    assert torch.all(grads[0].transpose(1, 2)[hidden.transpose(1, 2)] == 0)
    return o, lse, grads


def grouped_inputs(batch, heads, kv_heads, n_q, n_k, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    make = lambda h, n: torch.randn(batch, h, n, head_dim, generator=gen, dtype=dtype)
    return make(heads, n_q), make(kv_heads, n_k), make(kv_heads, n_k), make(heads, n_q)


# (batch, query heads, kv heads, Nq, Nk, head dim): two query tiles per head, so that the dK/dV
# block's walk over its group crosses from one head's tiles to the next.
GROUPED = [(1, 4, 2, 70, 67, 32), (2, 3, 1, 33, 70, 40)]


@pytest.mark.parametrize("shape", GROUPED, ids=["gqa2", "mqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_grouped_query_heads(dtype, causal, shape):
    _, _, grads = check_options_against_reference(*grouped_inputs(*shape, dtype), causal)
    assert grads[1].shape == grads[2].shape == (shape[0], shape[2], shape[4], shape[5])


def test_grouped_gradients_are_bitwise_repeatable():
    """dK and dV sum the group's heads in one fixed order: random warp delays change no bit."""
    q, k, v, dout = grouped_inputs(1, 4, 1, 70, 67, 32, torch.float16)
    o, lse = emu.forward(q, k, v, True, 0.2)
    calm = emu.backward(dout, q, k, v, o, lse, True, 0.2)
    emu.configure(eager_copies=True, delay_seed=3, delay_max_us=200)
    raced = emu.backward(dout, q, k, v, o, lse, True, 0.2)
    assert all(torch.equal(a, b) for a, b in zip(calm, raced))


def padding_mask(n_k):
    """Left padding over a whole 64-key tile, right padding over the last tile, random holes, and a
    batch element with every key masked."""
    mask = torch.ones(4, n_k, dtype=torch.bool)
    mask[0, :70] = False
    mask[1, 100:] = False
    mask[2] = torch.rand(n_k, generator=torch.Generator().manual_seed(5)) > 0.3
    mask[3] = False
    return mask


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_key_padding(dtype, causal):
    q, k, v, dout = grouped_inputs(4, 2, 1, 40, 150, 32, dtype)
    o, _, (dq, dk, dv) = check_options_against_reference(q, k, v, dout, causal, padding_mask(150))
    assert torch.all(o[3] == 0) and torch.all(dq[3] == 0)
    assert torch.all(dk[3] == 0) and torch.all(dv[3] == 0)
    assert torch.all(dk[0, :, :70] == 0) and torch.all(dv[1, :, 100:] == 0)


def test_padding_tiles_cost_no_mma():
    """Keys 64.. all padding: forward and backward run the MMAs of a 64-key call, no more."""
    q, k, v, dout = grouped_inputs(1, 1, 1, 40, 150, 64, torch.float16)
    mask = torch.zeros(1, 150, dtype=torch.bool)
    mask[:, :64] = True

    def mma_counts(*args):
        emu.reset_counters()
        o, lse = emu.forward(*args)
        forward = emu.counters()["mma"]
        emu.reset_counters()
        emu.backward(dout, *args[:3], o, lse, *args[3:])
        return forward, emu.counters()["mma"]

    padded = mma_counts(q, k, v, False, 0.125, mask)
    assert padded == mma_counts(q, k[:, :, :64], v[:, :, :64], False, 0.125)
    assert mma_counts(q, k, v, False, 0.125, torch.zeros_like(mask)) == (0, 0)


# Packed sequences: a zero-length query and key sequence, Nq != Nk in every sequence, and a
# sequence longer than one tile of either kind.
LENGTHS_Q = [0, 1, 17, 64, 113, 17]
LENGTHS_K = [17, 64, 1, 113, 0, 0]


def packed_inputs(dtype, heads=2, kv_heads=1, head_dim=32):
    """(q, k, v, dout) as (1, H, total, D) views of flash-attn's (total, H, D) tensors, and cu_seqlens."""
    gen = torch.Generator().manual_seed(2)
    cu = lambda lengths: torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_q, cu_k = cu(LENGTHS_Q), cu(LENGTHS_K)
    packed = lambda total, h: torch.randn(total, h, head_dim, generator=gen, dtype=dtype).transpose(0, 1).unsqueeze(0)
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])
    q, k, v = packed(total_q, heads), packed(total_k, kv_heads), packed(total_k, kv_heads)
    return q, k, v, packed(total_q, heads), (cu_q, cu_k)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
def test_varlen(dtype, causal):
    q, k, v, dout, cu_seqlens = packed_inputs(dtype)
    o, lse, grads = check_options_against_reference(q, k, v, dout, causal, cu_seqlens=cu_seqlens,
                                                    max_seqlen=(max(LENGTHS_Q), max(LENGTHS_K)))
    # Outputs are views of contiguous (total, H, D) tensors; lse is (1, H, total_q).
    for ours, like in zip((o, *grads), (q, q, k, v)):
        assert ours.shape == like.shape and ours.squeeze(0).transpose(0, 1).is_contiguous()
    assert lse.shape == q.shape[:3] and lse.is_contiguous()


# --- score modifiers (SPEC11): sliding window, softcap, ALiBi, dropout ----------------------------------

def test_philox_matches_the_reference():
    """The kernels' Philox4x32-10 (run by the emulator) against attention.dropout's: the known answer,
    and counters and keys with every bit pattern the kernels feed it."""
    assert emu.philox((0, 0, 0, 0), (0, 0)) == (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)
    gen = torch.Generator().manual_seed(11)
    values = torch.randint(0, 2**32, (64, 6), generator=gen, dtype=torch.int64).tolist()
    values += [[2**32 - 1] * 6, [0, 1, 2**31, 2**32 - 1, 0xFFFF0000, 0x0000FFFF]]
    for c0, c1, c2, c3, k0, k1 in values:
        expected = tuple(int(word) for word in philox4x32((c0, c1, c2, c3), (k0, k1)))
        assert emu.philox((c0, c1, c2, c3), (k0, k1)) == expected


# (dtype, shape (B, H, Nq, Nk, D), window, causal): several query and key tiles of every kernel at
# each instantiated head dim, with the band's edges inside tiles, tiles skipped on both sides, and
# rows (Nq > Nk, small right bound) or keys (Nq < Nk, small left bound) that see nothing. One dtype
# per case: the emulator is slow, and the dtype only changes the MMA's rounding.
WINDOW_CASES = [
    (torch.float16, (1, 1, 150, 197, 64), (20, 0), True),
    (torch.bfloat16, (1, 1, 197, 67, 128), (9, 5), False),
    (torch.bfloat16, (1, 1, 40, 200, 64), (10, 0), True),
    (torch.float16, (1, 1, 70, 90, 200), (-1, 3), False),
    (torch.float16, (1, 1, 60, 60, 256), (17, 30), False),
]


@pytest.mark.parametrize("dtype,shape,window,causal", WINDOW_CASES,
                         ids=lambda c: dtype_ids(c) if isinstance(c, torch.dtype)
                         else "x".join(map(str, c)) if isinstance(c, tuple) else None)
def test_window_kernel_paths(dtype, shape, window, causal):
    check_against_reference(EMULATED_CUDA, *random_inputs(shape, dtype), causal, window=window)


def test_keys_no_query_sees_get_zero_gradients():
    """40 queries against 200 keys with window (10, 0): keys below 150 are seen by no query, so the
    dK/dV blocks of the first key tiles visit no query tile and must still write zeros."""
    q, k, v, dout = random_inputs((1, 2, 40, 200, 32), torch.float16)
    options = emu.score_options(True, window=(10, 0))
    o, lse = emu.forward(q, k, v, True, 0.2, None, None, None, 0, 0, *options)
    dq, dk, dv = emu.backward(dout, q, k, v, o, lse, True, 0.2, None, None, None, 0, 0, *options)
    assert torch.all(dk[:, :, :150] == 0) and torch.all(dv[:, :, :150] == 0)
    assert dk[:, :, 150:].abs().amax() > 0 and dv[:, :, 150:].abs().amax() > 0


def mma_counts(n, window, head_dim=32):
    """MMAs of one forward and one backward at Nq = Nk = n."""
    q, k, v, dout = random_inputs((1, 1, n, n, head_dim), torch.float16)
    options = emu.score_options(window[1] == 0, window=window)
    emu.reset_counters()
    o, lse = emu.forward(q, k, v, window[1] == 0, 0.2, None, None, None, 0, 0, *options)
    forward = emu.counters()["mma"]
    emu.reset_counters()
    emu.backward(dout, q, k, v, o, lse, window[1] == 0, 0.2, None, None, None, 0, 0, *options)
    return forward, emu.counters()["mma"]


def test_window_cost_grows_linearly():
    """A fixed window visits a fixed number of tiles per query tile and per key tile: the MMA count is
    affine in N (doubling N adds twice what the previous doubling added; N^2 would add four times)."""
    counts = [mma_counts(n, (40, 24)) for n in (64, 128, 256)]
    for small, middle, large in zip(*counts):  # forward, then backward
        assert large - middle == 2 * (middle - small) > 0


def test_a_window_longer_than_the_sequences_is_unbounded():
    """Bounds beyond every sequence (past int32 even) are -1: the same bits as no window."""
    q, k, v, dout = random_inputs((1, 1, 70, 90, 64), torch.bfloat16)
    plain = emu.forward(q, k, v, True, 0.125)
    huge = emu.forward(q, k, v, True, 0.125, None, None, None, 0, 0, 2**40, 0, 0.0, None, 0.0, 0, 0)
    assert all(torch.equal(a, b) for a, b in zip(plain, huge))


@pytest.mark.parametrize("dtype,head_dim", [(torch.float16, 64), (torch.bfloat16, 128), (torch.float16, 256)],
                         ids=["float16-64", "bfloat16-128", "float16-256"])
def test_softcap_with_large_scores(dtype, head_dim):
    """Scores in the hundreds capped at 5 (tanh saturated, its derivative near 0), and in causal rows
    over several key tiles."""
    q, k, v, dout = random_inputs((1, 1, 70, 100, head_dim), dtype)
    check_against_reference(EMULATED_CUDA, (q.float() * 6).to(dtype), k, v, dout, True, softcap=5.0)


def test_alibi_per_batch_and_head_with_grouped_heads():
    """The dK/dV block walks the query heads of its group: each step takes its own head's slope."""
    q, k, v, dout = random_inputs((2, 4, 70, 100, 32), torch.bfloat16, kv_heads=2)
    check_against_reference(EMULATED_CUDA, q, k, v, dout, False, alibi_slopes=alibi_slopes(4, 2), window=(50, 10))


def one_hot_rows(batch, heads, n, head_dim, dtype):
    """Row r of every (batch, head) is the unit vector e_r (n <= head_dim)."""
    return torch.eye(n, head_dim, dtype=dtype).expand(batch, heads, n, head_dim).contiguous()


@pytest.mark.parametrize("head_dim", [128, 256])
def test_dropout_keeps_exactly_the_reference_mask(head_dim):
    """With q = 0 every visible probability is 1 / Nk, and with v = one-hot rows o[i, j] is nonzero iff
    key j is kept for query i: the forward's mask, bit for bit. With dout = one-hot rows, dv[j, i] =
    P[i, j] keep[i, j] / (1 - p): the dK/dV kernel's (transposed) mask, bit for bit. Several tiles of
    keys and queries, two batch elements and heads."""
    batch, heads, n_q, n_k, p, seed, offset = 2, 2, 70, 100, 0.3, 2**40 + 12345, 2**32 - 3
    q = torch.zeros(batch, heads, n_q, head_dim, dtype=torch.float16)
    k = torch.randn(batch, heads, n_k, head_dim, dtype=torch.float16)
    v = one_hot_rows(batch, heads, n_k, head_dim, torch.float16)
    dout = one_hot_rows(batch, heads, n_q, head_dim, torch.float16)
    options = (-1, -1, 0.0, None, p, seed, offset)
    o, lse = emu.forward(q, k, v, False, 0.1, None, None, None, 0, 0, *options)
    _, _, dv = emu.backward(dout, q, k, v, o, lse, False, 0.1, None, None, None, 0, 0, *options)
    mask = attention.dropout_mask(p, seed, offset, batch, heads, n_q, n_k)
    assert torch.equal(o[..., :n_k] != 0, mask)
    assert torch.equal(dv[..., :n_q] != 0, mask.transpose(-1, -2))
    assert abs(mask.float().mean().item() - (1 - p)) < 0.02


@pytest.mark.parametrize("head_dim", [64, 128])
def test_dropout_with_grouped_heads_and_window(head_dim):
    """Exact against the reference given the mask, with the dK/dV block's group walk (each head's own
    Philox counter), several key tiles and a window."""
    q, k, v, dout = random_inputs((1, 4, 70, 100, head_dim), torch.bfloat16, kv_heads=2)
    check_with_dropout(EMULATED_CUDA, q, k, v, dout, True, 0.4, seed=31337, window=(60, 0))


def test_modifiers_on_packed_sequences_with_more_tiles():
    """Every modifier on packed sequences longer than one tile: positions, slopes and Philox counters
    are the sequence's own."""
    lengths = [(100, 130), (3, 70), (67, 20)]
    cu = lambda i: torch.tensor([0] + [n[i] for n in lengths]).cumsum(0).to(torch.int32)
    gen = torch.Generator().manual_seed(4)
    make = lambda total, h: torch.randn(total, h, 64, generator=gen, dtype=torch.float16)
    total_q, total_k = sum(n[0] for n in lengths), sum(n[1] for n in lengths)
    q, k, v, dout = make(total_q, 2), make(total_k, 1), make(total_k, 1), make(total_q, 2)
    max_q, max_k = 100, 130
    slopes, p, seed = alibi_slopes(2, len(lengths)), 0.25, 8
    modifiers = dict(window=(40, 7), softcap=4.0, alibi_slopes=slopes)
    mask = attention.dropout_mask(p, seed, 0, len(lengths), 2, max_q, max_k)
    ours = lambda q, k, v: flash_attention_varlen(q, k, v, cu(0), cu(1), max_q, max_k, EMULATED_CUDA,
                                                  return_lse=True, dropout_p=p, dropout_seed=seed, **modifiers)
    reference = lambda q, k, v: naive_attention_varlen(q, k, v, cu(0), cu(1), return_lse=True,
                                                                 dropout_p=p, dropout_mask=mask, **modifiers)
    check(ours, reference, (q.float() * 2).half(), k, v, dout)


def test_modified_results_do_not_depend_on_timing():
    """The modified kernels with random per-warp delays: the same bits."""
    q, k, v, dout = random_inputs((1, 2, 65, 130, 64), torch.float16, kv_heads=1)
    options = (None, None, None, 0, 0, 30, 0, 6.0, alibi_slopes(2, 1), 0.2, 5, 9)

    def run():
        o, lse = emu.forward(q, k, v, True, 0.125, *options)
        return o, lse, *emu.backward(dout, q, k, v, o, lse, True, 0.125, *options)

    calm = run()
    emu.configure(eager_copies=True, delay_seed=5, delay_max_us=200)
    raced = run()
    assert all(torch.equal(a, b) for a, b in zip(calm, raced))


# --- decoding from a KV cache (issue 13) ---------------------------------------------------------------

def _decode_case(head_dim, n_q, group, block_size, seed=0):
    """A paged cache of 3 sequences (one empty) in blocks of `block_size`, NaN wherever no key lies."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([0, 37, 90], dtype=torch.int32)
    blocks_per_sequence = -(-96 // block_size)
    pool = torch.full((3 * blocks_per_sequence + 2, 2, block_size, head_dim), float("nan"), dtype=torch.bfloat16)
    k_pool, v_pool = pool.clone(), pool.clone()
    table = torch.randperm(pool.shape[0], generator=gen)[:3 * blocks_per_sequence].to(torch.int32).view(3, -1)
    for b, n in enumerate(lengths.tolist()):
        for j in range(n):
            for t in (k_pool, v_pool):
                t[table[b, j // block_size], :, j % block_size] = torch.randn(2, head_dim, generator=gen)
    q = torch.randn(3, 2 * group, n_q, head_dim, generator=gen).to(torch.bfloat16)
    return q, k_pool, v_pool, lengths, table


def _decode_reference_check(q, k_pool, v_pool, lengths, table, o_parts, lse_parts, **modifiers):
    o, lse = attention.merge.merge_partials(o_parts, lse_parts)
    ref_o, ref_lse = attention.reference.naive_attention_with_kvcache(
        q.double(), k_pool.double(), v_pool.double(), lengths, table, return_lse=True, **modifiers)
    low_o, _ = attention.reference.naive_attention_with_kvcache(q, k_pool, v_pool, lengths, table, return_lse=True,
                                                                **modifiers)
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())
    assert_within_rule("o", o, ref_o, low_o, 2)


@pytest.mark.parametrize("head_dim", [40, 200])
def test_decode_rows_over_one_tile_blocks_of_five_and_a_window(head_dim):
    """20 packed rows (a group of 4 query heads x 5 queries: two row tiles), blocks of 5 keys, a window that
    leaves key tiles unread, 3 splits of ragged sequences; head dim 200 takes the 256 kernel's 84 KB."""
    q, k_pool, v_pool, lengths, table = _decode_case(head_dim, 5, 4, 5)
    o_parts, lse_parts = emu.decode(q, k_pool, v_pool, lengths, table, True, 0.3, 20, 0, 0.0, None, 3)
    assert not o_parts.isnan().any() and not lse_parts.isnan().any()
    _decode_reference_check(q, k_pool, v_pool, lengths, table, o_parts, lse_parts, softmax_scale=0.3, window=(20, 0))


def test_decode_results_do_not_depend_on_timing():
    """Random per-warp delays: a missing barrier between the tile loads and their readers would show."""
    q, k_pool, v_pool, lengths, table = _decode_case(64, 2, 4, 16, seed=1)
    calm = emu.decode(q, k_pool, v_pool, lengths, table, True, 0.125, -1, 0, 0.0, None, 2)
    emu.configure(eager_copies=True, delay_seed=11, delay_max_us=200)
    raced = emu.decode(q, k_pool, v_pool, lengths, table, True, 0.125, -1, 0, 0.0, None, 2)
    for a, b in zip(calm, raced):
        assert torch.equal(a, b)


def test_decode_kernel_fits_an_sm86_device():
    emu.configure(device="sm_86")
    q, k_pool, v_pool, lengths, table = _decode_case(256, 1, 2, 16)
    emu.decode(q, k_pool, v_pool, lengths, table, True, 0.1, -1, 0, 0.0, None, 1)
