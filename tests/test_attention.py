"""Every fused backend, through the public API, against the float64 naive reference.

The default grid is small enough for CI's CPU (C++ kernels, Triton on its interpreter);
``pytest --full`` on a GPU runs the whole grid in fp16/bf16.
"""
import pytest
import torch

import attention
from attention.reference import naive_attention_varlen
from grid import (
    DEVICE,
    EMULATED_CUDA,
    INTERPRETED,
    assert_within_rule,
    case_grid,
    flash_attention,
    flash_attention_varlen,
    poison_allocator,
)

# The score-modifier tests run in every dtype on the C++ kernels, but in bf16 alone where a test takes
# seconds (Triton's interpreter, the CUDA emulator): each of those backends' own tests cover the others.
ONE_DTYPE_WHEN_SLOW = ("test_sliding_window", "test_window_hides_every_key_of_some_rows", "test_softcap", "test_alibi",
                       "test_dropout_matches_reference_given_the_mask", "test_dropout_seeds",
                       "test_all_modifiers_with_grouped_heads_and_padding", "test_all_modifiers_varlen",
                       "test_torch_compile_fullgraph_with_modifiers")


def _slow(backend):
    return backend == EMULATED_CUDA or (backend == "triton" and INTERPRETED)


def pytest_generate_tests(metafunc):
    full = metafunc.config.getoption("--full")
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("backend,dtype,shape", case_grid(full))
    elif "backend" in metafunc.fixturenames:
        cases = case_grid(full, with_shapes=False)
        if metafunc.function.__name__ in ONE_DTYPE_WHEN_SLOW and not full:
            cases = [c for c in cases if not _slow(c.values[0]) or c.values[1] == torch.bfloat16]
        metafunc.parametrize("backend,dtype", cases)


def random_inputs(shape, dtype, seed=0, kv_heads=None):
    """q, k, v, dout for (batch, heads, Nq, Nk, head_dim); k and v with kv_heads heads if given (GQA)."""
    batch, heads, n_q, n_k, head_dim = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    make = lambda h, n: torch.randn(batch, h, n, head_dim, generator=gen, device=DEVICE, dtype=dtype)
    kv_heads = heads if kv_heads is None else kv_heads
    return make(heads, n_q), make(kv_heads, n_k), make(kv_heads, n_k), make(heads, n_q)


def run(attend, q, k, v, dout):
    """Output, lse and gradients of attend(q, k, v) -> (o, lse) on fresh leaves."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o, lse = attend(q, k, v)
    o.backward(dout)
    return o, lse, q.grad, k.grad, v.grad


def check(ours_fn, reference_fn, q, k, v, dout):
    """ours_fn against reference_fn in float64 by the 2x / 3x rule; returns ours (o, lse, dq, dk, dv)."""
    poison_allocator()
    ours = run(ours_fn, q, k, v, dout)
    ref = run(reference_fn, *(t.double() for t in (q, k, v, dout)))
    lowprec = run(reference_fn, q, k, v, dout)
    lse, ref_lse, lowprec_lse = ours[1], ref[1], lowprec[1]
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
    hidden = ref_lse.isinf()
    assert torch.equal(lse.isneginf(), hidden), "lse must be -inf exactly on rows that see no key"
    assert_within_rule("lse", lse[~hidden], ref_lse[~hidden], lowprec_lse[~hidden], 2)
    assert ours[0].dtype == q.dtype
    for name, factor, a, r, lp in zip(("o", "dq", "dk", "dv"), (2, 3, 3, 3), ours[:1] + ours[2:], ref[:1] + ref[2:],
                                      lowprec[:1] + lowprec[2:]):
        assert_within_rule(name, a, r, lp, factor)
    return ours


def check_against_reference(backend, q, k, v, dout, causal, softmax_scale=None, **options):
    """flash_attention on `backend` against the naive reference; options: key_padding_mask."""
    ours = lambda q, k, v: flash_attention(q, k, v, backend, causal=causal, softmax_scale=softmax_scale,
                                           return_lse=True, **options)
    reference = lambda q, k, v: attention.naive_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                                          return_lse=True, **options)
    return check(ours, reference, q, k, v, dout)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_matches_reference(backend, dtype, shape, causal):
    check_against_reference(backend, *random_inputs(shape, dtype), causal)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_strided_inputs_read_in_place(backend, dtype, causal):
    """q, k, v as views of a packed qkv projection and dO transposed: no contiguous copies needed."""
    batch, n, heads, head_dim = 2, 37, 3, 48
    qkv = torch.randn(batch, n, 3, heads, head_dim, device=DEVICE, dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, N, D), strides of the packed buffer
    dout = torch.randn(batch, n, heads, head_dim, device=DEVICE, dtype=dtype).transpose(1, 2)
    assert not q.is_contiguous() and not dout.is_contiguous()
    check_against_reference(backend, q, k, v, dout, causal)


def misaligned(shape, dtype, generator):
    """A view whose data pointer is 2 bytes past a 16-byte boundary and whose rows are D + 3 elements apart."""
    batch, heads, n, head_dim = shape
    storage = torch.randn(batch, heads, n, head_dim + 3, generator=generator, device=DEVICE).to(dtype)
    view = storage[..., 1 : 1 + head_dim]
    assert view.data_ptr() % 16 != 0
    return view


def test_misaligned_views(backend, dtype):
    """Rows that cannot be moved in 16-byte chunks: the kernels' element-wise copy paths."""
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    q, dout = (misaligned((1, 2, 70, 64), dtype, gen) for _ in range(2))
    k, v = (misaligned((1, 2, 130, 64), dtype, gen) for _ in range(2))
    check_against_reference(backend, q, k, v, dout, causal=True)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_no_out_of_bounds_reads(backend, dtype, causal):
    """Views inside NaN-filled storage: any read past a tensor's edge would turn results NaN."""
    batch, heads, n_q, n_k, head_dim = 1, 2, 19, 23, 40

    def nan_padded(n):
        storage = torch.full((batch, heads + 1, n + 16, head_dim + 24), float("nan"), device=DEVICE, dtype=dtype)
        view = storage[:, 1:, 8 : 8 + n, 8 : 8 + head_dim]
        view.copy_(torch.randn(batch, heads, n, head_dim, device=DEVICE, dtype=dtype))
        return view

    check_against_reference(backend, nan_padded(n_q), nan_padded(n_k), nan_padded(n_k), nan_padded(n_q), causal)


def test_rows_without_keys_are_zero(backend, dtype):
    """Causal with Nq > Nk: the first Nq - Nk queries see no key (bottom-right alignment)."""
    q, k, v, dout = random_inputs((1, 2, 29, 11, 32), dtype)
    o, lse, dq, dk, dv = check_against_reference(backend, q, k, v, dout, causal=True)
    assert torch.all(o[:, :, :18] == 0) and torch.all(dq[:, :, :18] == 0)
    assert torch.all(lse[:, :, :18] == float("-inf")) and torch.isfinite(lse[:, :, 18:]).all()
    for t in (o, dq, dk, dv):
        assert not t.isnan().any()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_deterministic(backend, dtype, causal):
    """Two runs on the same inputs are bitwise equal, gradients included (no atomics)."""
    inputs = random_inputs((2, 4, 67, 53, 32), dtype, kv_heads=2)  # dk, dv also sum over a group of heads
    padding = torch.arange(53, device=DEVICE) < torch.tensor([[53], [30]], device=DEVICE)
    attend = lambda q, k, v: flash_attention(q, k, v, backend, causal=causal, return_lse=True)
    attend_padded = lambda q, k, v: flash_attention(q, k, v, backend, causal=causal, return_lse=True,
                                                    key_padding_mask=padding)
    first, second = run(attend, *inputs), run(attend, *inputs)
    first += run(attend_padded, *inputs)
    second += run(attend_padded, *inputs)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_scale(backend, dtype, causal):
    """A scale other than 1/sqrt(d), forward and backward."""
    check_against_reference(backend, *random_inputs((1, 2, 33, 45, 64), dtype), causal, softmax_scale=0.3)


def test_torch_compile_fullgraph(backend, dtype):
    """A function calling our op traces into one graph (no graph break) and gives the eager result:
    plain, with grouped heads and a key-padding mask, and packed varlen."""
    q, k, v, dout = random_inputs((2, 4, 17, 17, 32), dtype, kv_heads=2)
    padding = torch.arange(17, device=DEVICE) < torch.tensor([[17], [9]], device=DEVICE)
    packed, _, _, _, cu_q, cu_k, max_q, max_k = packed_inputs([(5, 7), (12, 9)], 4, 2, 32, dtype)

    def layer(q, k, v, packed):
        plain = flash_attention(q * 1.5, k, v, backend, causal=True).sum(dim=1)
        padded = flash_attention(q, k, v, backend, causal=True, key_padding_mask=padding).sum(dim=1)
        varlen = flash_attention_varlen(packed, packed[:16, :2], packed[:16, :2], cu_q, cu_k, max_q, max_k,
                                        backend, causal=True)
        return plain, padded, varlen

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    for ours, eager in zip(compiled(q, k, v, packed), layer(q, k, v, packed)):
        torch.testing.assert_close(ours, eager)


# ---- grouped-query heads, key padding and packed variable-length batches


# (query heads, key/value heads): groups of 2, 4 and 8 (MQA: one KV head); group 1 is every other test
GQA_HEADS = [(4, 2), (8, 2), (8, 1)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads,kv_heads", GQA_HEADS, ids=["gqa2", "gqa4", "mqa8"])
def test_grouped_query_heads(backend, dtype, heads, kv_heads, causal):
    """k and v with fewer heads than q: dk and dv sum over each group of query heads."""
    q, k, v, dout = random_inputs((2, heads, 37, 45, 32), dtype, kv_heads=kv_heads)
    check_against_reference(backend, q, k, v, dout, causal)


def padding_mask(pattern, batch, n_k, seed=0):
    """bool (batch, Nk), True where the key is real, in one of the shapes real batches come in."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.arange(n_k)
    lengths = torch.randint(1, n_k, (batch,), generator=gen)
    if pattern == "right":  # a batch of different lengths, padded at the end
        mask = keys < lengths[:, None]
    elif pattern == "left":  # padded at the start, as generation batches are
        mask = keys >= (n_k - lengths)[:, None]
    elif pattern == "holes":
        mask = torch.rand(batch, n_k, generator=gen) > 0.4
    else:  # "empty": one batch element has no real key at all
        mask = keys < lengths[:, None]
        mask[1] = False
    return mask.to(DEVICE)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("pattern", ["right", "left", "holes", "empty"])
def test_key_padding(backend, dtype, pattern, causal):
    """Keys hidden per batch element; 150 keys so that whole key tiles are padding (and skipped)."""
    q, k, v, dout = random_inputs((2, 2, 41, 150, 32), dtype)
    mask = padding_mask(pattern, 2, 150)
    o, lse, dq, dk, dv = check_against_reference(backend, q, k, v, dout, causal, key_padding_mask=mask)
    hidden = ~mask[:, None, :, None].expand_as(dk)
    assert torch.all(dk[hidden] == 0) and torch.all(dv[hidden] == 0), "a padding key must get no gradient"
    if pattern == "empty":
        assert torch.all(o[1] == 0) and torch.all(dq[1] == 0) and torch.all(lse[1] == float("-inf"))


def test_key_padding_with_grouped_heads(backend, dtype):
    q, k, v, dout = random_inputs((2, 4, 29, 70, 48), dtype, kv_heads=2)
    check_against_reference(backend, q, k, v, dout, True, key_padding_mask=padding_mask("holes", 2, 70))


# Per sequence (Nq, Nk): empty queries, a query with no key, Nq != Nk both ways, several tiles.
VARLEN_LENGTHS = [(0, 4), (1, 17), (17, 1), (64, 113), (113, 64), (9, 0)]


def packed_inputs(lengths, heads, kv_heads, head_dim, dtype, seed=0):
    """q, k, v, dout in flash-attn's packed layout and the int32 cu_seqlens / max lengths."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    total_q, total_k = (sum(n[i] for n in lengths) for i in (0, 1))
    make = lambda total, h: torch.randn(total, h, head_dim, generator=gen, device=DEVICE, dtype=dtype)
    offsets = lambda i: torch.tensor([0] + [n[i] for n in lengths], device=DEVICE).cumsum(0).to(torch.int32)
    max_q, max_k = (max(n[i] for n in lengths) for i in (0, 1))
    return (make(total_q, heads), make(total_k, kv_heads), make(total_k, kv_heads), make(total_q, heads),
            offsets(0), offsets(1), max_q, max_k)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1)], ids=["mha", "mqa"])
def test_varlen(backend, dtype, heads, kv_heads, causal):
    """Sequences of mixed lengths packed with no padding, causal bottom-right within each sequence."""
    q, k, v, dout, cu_q, cu_k, max_q, max_k = packed_inputs(VARLEN_LENGTHS, heads, kv_heads, 40, dtype)
    ours = lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend, causal=causal,
                                                  return_lse=True)
    reference = lambda q, k, v: naive_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
    o, lse, dq, dk, dv = check(ours, reference, q, k, v, dout)
    assert o.shape == q.shape and o.is_contiguous() and lse.shape == (heads, q.shape[0])
    last = int(cu_q[-2])
    assert torch.all(o[last:] == 0) and torch.all(dq[last:] == 0), "the last sequence has no key"


def test_varlen_matches_padded_batch(backend, dtype):
    """The same sequences as a right-padded dense batch with a key-padding mask give the same rows."""
    lengths = [(13, 13), (40, 40), (1, 1)]
    q, k, v, _, cu_q, cu_k, max_q, max_k = packed_inputs(lengths, 2, 2, 32, dtype)
    packed = flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend, causal=True)
    bounds = list(zip(cu_q.tolist(), cu_q.tolist()[1:]))

    def pad(t):
        dense = t.new_zeros(len(lengths), max_q, *t.shape[1:])
        for b, (start, end) in enumerate(bounds):
            dense[b, : end - start] = t[start:end]
        return dense.transpose(1, 2)  # (B, H, N, D)

    real = torch.arange(max_k, device=DEVICE) < (cu_k[1:] - cu_k[:-1])[:, None]
    # Nq == Nk padded, so bottom-right causal hides the same keys from every real row as in each sequence
    dense = flash_attention(pad(q), pad(k), pad(v), backend, causal=True, key_padding_mask=real)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for b, (start, end) in enumerate(bounds):
        torch.testing.assert_close(packed[start:end].float(), dense[b, :, : end - start].transpose(0, 1).float(),
                                   atol=tolerance, rtol=tolerance)


# ---- score modifiers: sliding window, softcap, ALiBi, dropout

# (left, right) with and without causal: bands on both sides, one side unbounded, the diagonal alone.
WINDOWS = [((5, 0), False), ((3, 9), False), ((-1, 4), False), ((0, 0), False), ((12, -1), True)]


@pytest.mark.parametrize("window,causal", WINDOWS, ids=["left5", "band3-9", "right4", "diagonal", "causal-left12"])
def test_sliding_window(backend, dtype, window, causal):
    """130 keys: key tiles wholly outside the band are skipped, tiles on its edges masked."""
    q, k, v, dout = random_inputs((1, 1, 70, 130, 32), dtype)
    check_against_reference(backend, q, k, v, dout, causal, window=window)


def test_window_hides_every_key_of_some_rows(backend, dtype):
    """Nq > Nk and window (2, 0): queries i < Nq - Nk see no key (o 0, lse -inf, no gradient)."""
    q, k, v, dout = random_inputs((1, 2, 40, 17, 32), dtype)
    o, lse, dq, dk, dv = check_against_reference(backend, q, k, v, dout, False, window=(2, 0))
    assert torch.all(o[:, :, :23] == 0) and torch.all(dq[:, :, :23] == 0)
    assert torch.all(lse[:, :, :23] == float("-inf")) and torch.isfinite(lse[:, :, 23:]).all()


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(backend, dtype, causal):
    """Scores far beyond the cap (q scaled up): tanh saturates, and its derivative reaches the gradients."""
    q, k, v, dout = random_inputs((1, 2, 37, 45, 32), dtype)
    check_against_reference(backend, q * 4, k, v, dout, causal, softcap=5.0)


def alibi_slopes(heads, batch=None):
    """ALiBi's geometric slopes 2^(-8h/H), float32 (H,), or per (batch, head) with a different scale per batch."""
    slopes = 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=DEVICE) / heads)
    if batch is None:
        return slopes.float()
    return (slopes[None, :] * torch.arange(1, batch + 1, device=DEVICE)[:, None]).float()


@pytest.mark.parametrize("per_batch,causal", [(False, False), (True, True)], ids=["per-head", "per-batch-head-causal"])
def test_alibi(backend, dtype, per_batch, causal):
    q, k, v, dout = random_inputs((2, 3, 33, 50, 32), dtype)
    slopes = alibi_slopes(3, 2 if per_batch else None)
    check_against_reference(backend, q, k, v, dout, causal, alibi_slopes=slopes)


def check_with_dropout(backend, q, k, v, dout, causal, dropout_p, seed, **options):
    """Ours with dropout_seed against the reference given the mask attention.dropout_mask draws for it."""
    mask = attention.dropout_mask(dropout_p, seed, 0, q.shape[0], q.shape[1], q.shape[2], k.shape[2], DEVICE)
    ours = lambda q, k, v: flash_attention(q, k, v, backend, causal=causal, return_lse=True, dropout_p=dropout_p,
                                           dropout_seed=seed, **options)
    reference = lambda q, k, v: attention.naive_attention(q, k, v, causal=causal, return_lse=True,
                                                          dropout_p=dropout_p, dropout_mask=mask, **options)
    return check(ours, reference, q, k, v, dout)


@pytest.mark.parametrize("dropout_p,causal", [(0.17, False), (0.6, True)], ids=["0.17", "0.6-causal"])
def test_dropout_matches_reference_given_the_mask(backend, dtype, dropout_p, causal):
    """Every backend draws attention.dropout_mask's bits: exact agreement, forward and gradients."""
    q, k, v, dout = random_inputs((2, 2, 37, 45, 32), dtype)
    check_with_dropout(backend, q, k, v, dout, causal, dropout_p, seed=1234567890123)


def test_dropout_seeds(backend, dtype):
    """Same seed: bitwise the same output; another seed: another one; no seed: torch.manual_seed's."""
    q, k, v, _ = random_inputs((1, 2, 24, 24, 32), dtype)
    attend = lambda **seed: flash_attention(q, k, v, backend, dropout_p=0.3, **seed)
    assert torch.equal(attend(dropout_seed=7), attend(dropout_seed=7))
    assert not torch.equal(attend(dropout_seed=7), attend(dropout_seed=8))
    torch.manual_seed(3)
    first = attend()
    torch.manual_seed(3)
    assert torch.equal(first, attend())
    assert not torch.equal(first, attend())


def test_all_modifiers_with_grouped_heads_and_padding(backend, dtype):
    """Window, softcap, ALiBi and dropout at once, with GQA and left padding."""
    q, k, v, dout = random_inputs((2, 4, 29, 70, 32), dtype, kv_heads=2)
    check_with_dropout(backend, q * 2, k, v, dout, True, 0.25, seed=99, window=(20, 0), softcap=8.0,
                       alibi_slopes=alibi_slopes(4, 2), key_padding_mask=padding_mask("left", 2, 70))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_all_modifiers_varlen(backend, dtype, causal):
    """Window, softcap, ALiBi and dropout on packed sequences: positions counted within each sequence."""
    lengths = [(0, 4), (17, 1), (40, 77), (30, 30)]
    q, k, v, dout, cu_q, cu_k, max_q, max_k = packed_inputs(lengths, 4, 2, 40, dtype)
    slopes, seed, p = alibi_slopes(4, len(lengths)), 5, 0.2
    modifiers = dict(window=(9, 3), softcap=6.0, alibi_slopes=slopes)
    mask = attention.dropout_mask(p, seed, 0, len(lengths), 4, max_q, max_k, DEVICE)
    ours = lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, backend, causal=causal,
                                                  return_lse=True, dropout_p=p, dropout_seed=seed, **modifiers)
    reference = lambda q, k, v: naive_attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True,
                                                       dropout_p=p, dropout_mask=mask, **modifiers)
    check(ours, reference, q * 2, k, v, dout)


def test_torch_compile_fullgraph_with_modifiers(backend, dtype):
    """The score modifiers trace too (dropout with a given seed: drawing one would break the graph)."""
    q, k, v, _ = random_inputs((2, 2, 17, 17, 32), dtype)
    slopes = alibi_slopes(2)

    def layer(q, k, v):
        return flash_attention(q, k, v, backend, window=(4, 0), softcap=3.0, alibi_slopes=slopes, dropout_p=0.1,
                               dropout_seed=11)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))
