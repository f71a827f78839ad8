"""The C++ CPU kernels, called as the raw ops torch.ops.fused_attention.fwd / .bwd.

Held against a plain-torch float64 reference written here (the public API goes through the shared grid):
odd lengths, Nq != Nk both ways, bottom-right causal masks, head dims up to 256, fp32 / bf16 / fp16,
strided and NaN-padded inputs, rows that see no key, determinism, and the C++ input checks; the
options of issue 10: grouped-query heads, key padding masks and packed variable-length batches; and
those of issue 11 (sliding windows and their tile skipping, softcap, ALiBi, dropout), held against the
public float64 reference attention.naive_attention, dropout given attention.dropout_mask.
"""
import functools
import itertools
import math

import pytest
import torch

import attention
from attention.merge import merge_partials
from attention.reference import naive_attention_varlen, naive_attention_with_kvcache

from grid import assert_within_rule, max_err

pytest.importorskip("attention._C", reason="the C++ extension attention._C is not built")



def fwd(q, k, v, causal, scale, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
        max_seqlen_k=0, window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=0,
        dropout_offset=0):
    """The raw forward op, with the options of issues 10 and 11 defaulting to off. causal=True passes the window's
    right bound as 0, as the Python layer does."""
    return torch.ops.fused_attention.fwd(q, k, v, causal, scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k, *score_options(causal, window, softcap,
                                                                                   alibi_slopes, dropout_p,
                                                                                   dropout_seed, dropout_offset))


def bwd(dout, q, k, v, o, lse, causal, scale, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
        max_seqlen_q=0, max_seqlen_k=0, window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
        dropout_seed=0, dropout_offset=0):
    """The raw backward op, with the options of issues 10 and 11 defaulting to off."""
    return torch.ops.fused_attention.bwd(dout, q, k, v, o, lse, causal, scale, key_padding_mask, cu_seqlens_q,
                                         cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         *score_options(causal, window, softcap, alibi_slopes, dropout_p,
                                                        dropout_seed, dropout_offset))


def score_options(causal, window, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset):
    """The ops' arguments window_left .. dropout_offset."""
    left, right = window
    return left, 0 if causal else right, softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset


DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (batch, heads, Nq, Nk, head_dim)
SHAPES = [
    (1, 1, 1, 1, 16),
    (1, 1, 5, 9, 1),
    (2, 3, 17, 17, 40),
    (1, 2, 113, 113, 64),
    (1, 2, 113, 17, 96),  # Nq > Nk: with causal, the first 96 queries see no key
    (1, 2, 17, 113, 128),
    (1, 1, 1, 1023, 256),  # one decoding step against a long cache
    (1, 1, 1023, 1023, 64),
]


def random_inputs(shape, dtype, seed=0, kv_heads=None):
    """q, k, v and an output gradient dout, drawn in float32 then rounded to dtype; k and v with kv_heads heads
    (default: as many as q)."""
    batch, heads, n_q, n_k, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    sizes = [(heads, n_q), (kv_heads or heads, n_k), (kv_heads or heads, n_k), (heads, n_q)]
    return [torch.randn(batch, h, n, head_dim, generator=gen).to(dtype) for h, n in sizes]


def naive(q, k, v, dout, causal, scale, dtype, key_padding_mask=None):
    """o, lse, dq, dk, dv of softmax(scale q k^T) v computed in dtype, with each KV head repeated over its group of
    query heads, keys masked bottom-right when causal and where key_padding_mask (B, Nk) is False."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k_per_query_head, v_per_query_head = (x.repeat_interleave(group, dim=1) for x in (k, v))
    scores = (q @ k_per_query_head.transpose(-2, -1)) * scale
    n_q, n_k = scores.shape[-2:]
    hidden = torch.zeros(n_q, n_k, dtype=torch.bool)
    if causal:
        hidden = torch.arange(n_k)[None, :] > torch.arange(n_q)[:, None] + (n_k - n_q)
    if key_padding_mask is not None:
        hidden = hidden | ~key_padding_mask[:, None, None, :]
    # A row that sees no key would softmax to NaN: give it finite scores, then zero its weights.
    no_key = hidden.all(-1, keepdim=True)
    scores = scores.masked_fill(hidden & ~no_key, -math.inf).masked_fill(no_key, 0.0)
    p = torch.softmax(scores, dim=-1).masked_fill(no_key, 0.0)
    o = p @ v_per_query_head
    lse = torch.logsumexp(scores.double(), dim=-1).masked_fill(no_key.squeeze(-1), -math.inf)
    o.backward(dout.to(dtype))
    return o.detach(), lse, q.grad, k.grad, v.grad


def assert_close_to_reference(q, k, v, dout, causal, scale, o, lse, grads, key_padding_mask=None):
    assert_matches(lambda dtype: naive(q, k, v, dout, causal, scale, dtype, key_padding_mask), q.dtype, o, lse, grads)


def assert_matches(reference, dtype, o, lse, grads):
    """The tolerance rule: max|ours - ref| <= 2 x (3 x for gradients) max|same math in dtype - ref| + 1e-5, where
    reference(dtype) gives (o, lse, dq, dk, dv)."""
    ref = reference(torch.float64)
    low = reference(dtype)
    names = ["o", "dq", "dk", "dv"]
    for name, ours, r, lo, factor in zip(names, [o, *grads], ref[:1] + ref[2:], low[:1] + low[2:], [2, 3, 3, 3]):
        assert torch.isfinite(ours).all(), f"{name} has NaN or inf"
        assert_within_rule(name, ours, r, lo, factor)
    # lse is float32 from the exact float values of the inputs, whatever their dtype
    assert torch.equal(lse.isinf(), ref[1].isinf()), "lse is -inf exactly on the rows that see no key"
    assert max_err(lse.nan_to_num(neginf=0.0), ref[1].nan_to_num(neginf=0.0)) <= 2e-5


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_matches_reference(dtype, causal, shape):
    q, k, v, dout = random_inputs(shape, dtype)
    scale = shape[-1] ** -0.5
    o, lse = fwd(q, k, v, causal, scale)
    dq, dk, dv = bwd(dout, q, k, v, o, lse, causal, scale)

    assert o.dtype == dtype and o.shape == q.shape and o.is_contiguous()
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3] and lse.is_contiguous()
    for grad, x in zip((dq, dk, dv), (q, k, v)):
        assert grad.dtype == dtype and grad.shape == x.shape and grad.is_contiguous()
    assert_close_to_reference(q, k, v, dout, causal, scale, o, lse, (dq, dk, dv))


@pytest.mark.parametrize("n_k", [1, 63, 64, 65, 129, 165])
@pytest.mark.parametrize("n_q", [1, 63, 64, 65, 100, 130])
def test_tile_boundaries(n_q, n_k):
    """Lengths around the 64-row tiles, so that the causal diagonal crosses tiles at every offset."""
    q, k, v, dout = random_inputs((1, 1, n_q, n_k, 8), torch.float32, seed=n_q * 1000 + n_k)
    for causal in (False, True):
        o, lse = fwd(q, k, v, causal, 0.35)
        grads = bwd(dout, q, k, v, o, lse, causal, 0.35)
        assert_close_to_reference(q, k, v, dout, causal, 0.35, o, lse, grads)


@pytest.mark.parametrize("scale", [0.3, -0.05, 0.0])
def test_softmax_scale(scale):
    q, k, v, dout = random_inputs((1, 2, 70, 90, 48), torch.float32)
    o, lse = fwd(q, k, v, True, scale)
    assert_close_to_reference(q, k, v, dout, True, scale, o, lse, bwd(dout, q, k, v, o, lse, True, scale))


def packed_heads_layout(x):
    """x's values in a (B, N, H, D) buffer shared with two other tensors, seen as (B, H, N, D): strided rows."""
    packed = torch.stack([torch.zeros_like(x), x, torch.zeros_like(x)]).transpose(2, 3).contiguous()
    return packed.unbind(0)[1].transpose(1, 2)


def strided_last_dim(x):
    """x's values with a last-dim stride of 2 (the kernels copy such an input to contiguous rows first)."""
    buffer = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    buffer[..., ::2] = x
    return buffer[..., ::2]


@pytest.mark.parametrize("layout", [packed_heads_layout, strided_last_dim])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_strided_inputs(dtype, layout):
    q, k, v, dout = random_inputs((2, 3, 65, 47, 40), dtype)
    o, lse = fwd(q, k, v, True, 0.15)
    grads = bwd(dout, q, k, v, o, lse, True, 0.15)
    strided = [layout(x) for x in (q, k, v, dout, o)]
    assert not any(x.is_contiguous() for x in strided)
    o_strided, lse_strided = fwd(*strided[:3], True, 0.15)
    assert torch.equal(o_strided, o) and torch.equal(lse_strided, lse)
    for ours, expected in zip(bwd(strided[3], *strided[:3], strided[4], lse, True, 0.15), grads):
        assert torch.equal(ours, expected)


def nan_padded(x):
    """x's values in the middle of a NaN-filled buffer: an out-of-bounds read makes the result NaN."""
    batch, heads, n, head_dim = x.shape
    buffer = torch.full((batch, heads + 1, n + 3, head_dim + 5), math.nan, dtype=x.dtype)
    view = buffer[:, 1:, 2 : n + 2, 3 : head_dim + 3]
    view.copy_(x)
    return view


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_nan_padded_storage(dtype):
    q, k, v, dout = (nan_padded(x) for x in random_inputs((2, 2, 70, 37, 24), dtype))
    for causal in (False, True):
        o, lse = fwd(q, k, v, causal, 0.2)
        grads = bwd(dout, q, k, v, nan_padded(o), nan_padded(lse[..., None])[..., 0], causal, 0.2)
        assert_close_to_reference(q, k, v, dout, causal, 0.2, o, lse, grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).removeprefix("torch."))
def test_every_16_bit_value_passes_through(dtype):
    """With one key, o = v: every fp16 / bf16 bit pattern (subnormals, inf, NaN) survives the kernel's conversions,
    but that AVX512_BF16's vdpbf16ps reads bf16 subnormals as 0 (as torch's own bf16 matmuls on such CPUs do)."""
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, 256, 1, 256)
    q = k = torch.zeros_like(v)
    o, _ = fwd(q, k, v, False, 1.0)
    expected = v
    if dtype == torch.bfloat16 and torch.ops.fused_attention.cpu_isa() == "avx512_bf16":
        expected = v.masked_fill(v.abs() < torch.finfo(dtype).tiny, 0.0)
    assert torch.equal(o.isnan(), v.isnan())
    assert torch.equal(o.nan_to_num(), expected.nan_to_num())  # -0.0 may come back as +0.0: equal values


def test_rows_without_keys_give_zeros():
    q, k, v, dout = random_inputs((1, 2, 80, 17, 32), torch.float32)
    o, lse = fwd(q, k, v, True, 0.2)
    dq, dk, dv = bwd(dout, q, k, v, o, lse, True, 0.2)
    blind = 80 - 17  # bottom-right causal: query i sees keys j <= i - 63
    assert torch.equal(o[:, :, :blind], torch.zeros_like(o[:, :, :blind]))
    assert torch.equal(dq[:, :, :blind], torch.zeros_like(dq[:, :, :blind]))
    assert (lse[:, :, :blind] == -math.inf).all() and torch.isfinite(lse[:, :, blind:]).all()
    assert all(torch.isfinite(x).all() for x in (o, dq, dk, dv))


def test_no_keys_at_all():
    q, _, _, dout = random_inputs((1, 2, 9, 0, 16), torch.float32)
    k = v = torch.empty(1, 2, 0, 16)
    o, lse = fwd(q, k, v, False, 0.25)
    dq, dk, dv = bwd(dout, q, k, v, o, lse, False, 0.25)
    assert torch.equal(o, torch.zeros_like(q)) and (lse == -math.inf).all()
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == k.shape and dv.shape == v.shape


def run_with_threads(threads, q, k, v, dout, causal, scale):
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        o, lse = fwd(q, k, v, causal, scale)
        return (o, lse, *bwd(dout, q, k, v, o, lse, causal, scale))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("heads, kv_heads", [(1, 1), (2, 1)], ids=["mha", "gqa"])
def test_repeatable_bit_for_bit(heads, kv_heads):
    """Every result is the same from run to run at a given thread count; o, lse, dk and dv at any thread count.

    dq is summed from per-thread buffers, so its rounding depends on how many threads share a KV head's key
    tiles: one KV head here, so that they do. With grouped heads, dk and dv sum over the group.
    """
    q, k, v, dout = random_inputs((1, heads, 300, 280, 64), torch.float32, kv_heads=kv_heads)
    first = {}
    for threads in (1, 2, 3, 2):
        results = run_with_threads(threads, q, k, v, dout, True, 0.125)
        first.setdefault(threads, results)
        assert all(torch.equal(a, b) for a, b in zip(results, first[threads]))
        o, lse, dq, dk, dv = results
        o1, lse1, dq1, dk1, dv1 = first[1]
        assert torch.equal(o, o1) and torch.equal(lse, lse1) and torch.equal(dk, dk1) and torch.equal(dv, dv1)
        torch.testing.assert_close(dq, dq1, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Grouped-query heads, key padding, packed variable-length batches (issue 10)

# (query heads, KV heads): groups of 1, 2 and 4 query heads per KV head, and multi-query (one KV head).
GROUPS = [(2, 2), (4, 2), (8, 2), (3, 1)]


@pytest.mark.parametrize("heads, kv_heads", GROUPS, ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_grouped_query_heads(dtype, causal, heads, kv_heads):
    q, k, v, dout = random_inputs((2, heads, 70, 90, 24), dtype, kv_heads=kv_heads)
    o, lse = fwd(q, k, v, causal, 0.2)
    dq, dk, dv = bwd(dout, q, k, v, o, lse, causal, 0.2)
    assert dk.shape == k.shape and dv.shape == v.shape and dk.is_contiguous() and dv.is_contiguous()
    assert_close_to_reference(q, k, v, dout, causal, 0.2, o, lse, (dq, dk, dv))
    # Each query head reads its KV head in place: the same numbers as with K and V expanded in memory.
    group = heads // kv_heads
    o_expanded, lse_expanded = fwd(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), causal, 0.2)
    assert torch.equal(o, o_expanded) and torch.equal(lse, lse_expanded)


def test_grouped_heads_read_strided_kv():
    """k and v as views into one packed (B, N, 2, Hkv, D) buffer, as a fused KV projection leaves them."""
    q, k, v, dout = random_inputs((2, 4, 33, 47, 16), torch.float32, kv_heads=2)
    kv = torch.stack([k, v], dim=2).permute(0, 3, 2, 1, 4).contiguous()  # (B, N, 2, Hkv, D)
    k_view, v_view = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
    assert not k_view.is_contiguous() and torch.equal(k_view, k)
    o, lse = fwd(q, k_view, v_view, True, 0.3)
    grads = bwd(dout, q, k_view, v_view, o, lse, True, 0.3)
    assert_close_to_reference(q, k, v, dout, True, 0.3, o, lse, grads)


def padding_masks(n_k):
    """A (4, n_k) key padding mask, one pattern per batch element: left padding over more than a whole key tile,
    right padding, random holes, and every key hidden."""
    mask = torch.ones(4, n_k, dtype=torch.bool)
    mask[0, :70] = False
    mask[1, 40:] = False
    mask[2] = torch.rand(n_k, generator=torch.Generator().manual_seed(1)) < 0.5
    mask[3] = False
    return mask


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_key_padding(dtype, causal, kv_heads):
    q, k, v, dout = random_inputs((4, 2, 65, 150, 32), dtype, kv_heads=kv_heads)
    mask = padding_masks(150)
    o, lse = fwd(q, k, v, causal, 0.2, mask)
    dq, dk, dv = bwd(dout, q, k, v, o, lse, causal, 0.2, mask)
    assert_close_to_reference(q, k, v, dout, causal, 0.2, o, lse, (dq, dk, dv), key_padding_mask=mask)
    # The batch element whose keys are all padding: no query sees a key.
    assert torch.equal(o[3], torch.zeros_like(o[3])) and (lse[3] == -math.inf).all()
    assert not dq[3].any() and not dk[3].any() and not dv[3].any()
    # A hidden key gets no gradient.
    hidden = ~mask[:, None, :, None]
    assert not dk.masked_select(hidden).any() and not dv.masked_select(hidden).any()


def test_padding_key_tiles_are_skipped():
    """The key tiles that are all padding are never read: NaN there leaves every result finite."""
    q, k, v, dout = random_inputs((2, 2, 40, 200, 16), torch.float32, kv_heads=1)
    mask = torch.ones(2, 200, dtype=torch.bool)
    mask[0, :128] = False  # key tiles 0 and 1 of batch element 0 (tiles of 64 keys)
    mask[1, 192:] = False  # tile 3 of batch element 1
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for x in (poisoned_k, poisoned_v):
        x[0, :, :128] = math.nan
        x[1, :, 192:] = math.nan
    for causal in (False, True):
        o, lse = fwd(q, poisoned_k, poisoned_v, causal, 0.25, mask)
        dq, dk, dv = bwd(dout, q, poisoned_k, poisoned_v, o, lse, causal, 0.25, mask)
        assert all(torch.isfinite(x).all() for x in (o, dq, dk, dv))
        assert_close_to_reference(q, k, v, dout, causal, 0.25, o, lse, (dq, dk, dv), key_padding_mask=mask)


def test_padding_mask_of_all_real_keys_changes_nothing():
    q, k, v, dout = random_inputs((2, 2, 70, 90, 16), torch.float32)
    o, lse = fwd(q, k, v, True, 0.3)
    grads = bwd(dout, q, k, v, o, lse, True, 0.3)
    mask = torch.ones(2, 90, dtype=torch.bool)
    o_masked, lse_masked = fwd(q, k, v, True, 0.3, mask)
    assert torch.equal(o_masked, o) and torch.equal(lse_masked, lse)
    assert all(torch.equal(a, b) for a, b in zip(bwd(dout, q, k, v, o, lse, True, 0.3, mask), grads))


# Per-sequence (query, key) lengths of one packed batch: lengths 0, 1, 17, 64 and 113 mixed, Nq != Nk both ways,
# a sequence with no queries, one with no keys (its queries see nothing), and one with neither.
VARLEN_LENGTHS = [(17, 64), (0, 17), (64, 64), (1, 113), (113, 17), (17, 0), (0, 0), (64, 1)]


def packed(lengths, heads, head_dim, dtype, seed):
    """A flash-attn packed tensor (total, heads, head_dim) seen as (1, heads, total, head_dim), as the ops take it."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(sum(lengths), heads, head_dim, generator=gen).to(dtype).transpose(0, 1).unsqueeze(0)


def cu_seqlens(lengths):
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def naive_varlen(q, k, v, dout, cu_q, cu_k, causal, scale, dtype):
    """naive over each packed sequence on its own, the results joined back along the rows."""
    parts = []
    for (q0, q1), (k0, k1) in zip(itertools.pairwise(cu_q.tolist()), itertools.pairwise(cu_k.tolist())):
        rows, keys = slice(q0, q1), slice(k0, k1)
        parts.append(naive(q[:, :, rows], k[:, :, keys], v[:, :, keys], dout[:, :, rows], causal, scale, dtype))
    return tuple(torch.cat(part, dim=2) for part in zip(*parts))


def assert_packed_layout(x):
    """x is the (1, H, total, D) view of a contiguous (total, H, D) tensor."""
    assert x.shape[0] == 1 and x[0].transpose(0, 1).is_contiguous()


@pytest.mark.parametrize("heads, kv_heads", [(2, 2), (4, 2), (3, 1)], ids=lambda x: str(x))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_varlen(dtype, causal, heads, kv_heads):
    lengths_q, lengths_k = zip(*VARLEN_LENGTHS)
    q, dout = (packed(lengths_q, heads, 24, dtype, seed) for seed in (0, 1))
    k, v = (packed(lengths_k, kv_heads, 24, dtype, seed) for seed in (2, 3))
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    varlen = (cu_q, cu_k, max(lengths_q), max(lengths_k))
    o, lse = fwd(q, k, v, causal, 0.2, None, *varlen)
    dq, dk, dv = bwd(dout, q, k, v, o, lse, causal, 0.2, None, *varlen)
    for x, like in ((o, q), (dq, q), (dk, k), (dv, v)):
        assert x.shape == like.shape and x.dtype == dtype
        assert_packed_layout(x)
    assert lse.shape == (1, heads, sum(lengths_q)) and lse.dtype == torch.float32 and lse.is_contiguous()
    reference = functools.partial(naive_varlen, q, k, v, dout, cu_q, cu_k, causal, 0.2)
    assert_matches(reference, dtype, o, lse, (dq, dk, dv))


def test_varlen_sequence_matches_dense():
    """A packed sequence gives the numbers of the same attention run alone as a dense batch of one."""
    lengths_q, lengths_k = (40, 70, 9), (90, 33, 9)
    q, dout = (packed(lengths_q, 2, 16, torch.float32, seed) for seed in (0, 1))
    k, v = (packed(lengths_k, 2, 16, torch.float32, seed) for seed in (2, 3))
    varlen = (cu_seqlens(lengths_q), cu_seqlens(lengths_k), 70, 90)
    o, lse = fwd(q, k, v, True, 0.3, None, *varlen)
    dq, dk, dv = bwd(dout, q, k, v, o, lse, True, 0.3, None, *varlen)
    rows, keys = slice(40, 110), slice(90, 123)
    o1, lse1 = fwd(q[:, :, rows], k[:, :, keys], v[:, :, keys], True, 0.3)
    dq1, dk1, dv1 = bwd(dout[:, :, rows], q[:, :, rows], k[:, :, keys], v[:, :, keys], o1, lse1, True, 0.3)
    assert torch.equal(o[:, :, rows], o1) and torch.equal(lse[:, :, rows], lse1)
    assert torch.equal(dq[:, :, rows], dq1) and torch.equal(dk[:, :, keys], dk1) and torch.equal(dv[:, :, keys], dv1)


def _inputs(**changes):
    """Valid (q, k, v) of shape (2, 3, 5|7, 16) float32, with some replaced."""
    tensors = {"q": torch.randn(2, 3, 5, 16), "k": torch.randn(2, 3, 7, 16), "v": torch.randn(2, 3, 7, 16)}
    tensors.update(changes)
    return tensors["q"], tensors["k"], tensors["v"]


def _same_head_dim(head_dim):
    return _inputs(**{name: torch.randn(1, 1, 2, head_dim) for name in "qkv"})


BAD_FORWARD_INPUTS = [
    pytest.param(_inputs(q=torch.randn(3, 5, 16)), "q must have rank 4", id="q-rank"),
    pytest.param(_inputs(v=torch.randn(2, 3, 7, 16, 1)), "v must have rank 4", id="v-rank"),
    pytest.param(_inputs(q=torch.randn(2, 3, 5, 16).double()), "q must be float16, bfloat16 or float32", id="q-dtype"),
    pytest.param(_inputs(k=torch.randn(2, 3, 7, 16).half()), r"k must have the same dtype as q \(got Half vs Float\)",
                 id="k-dtype"),
    pytest.param(_inputs(v=torch.randn(2, 3, 7, 16).bfloat16()), "v must have the same dtype as q", id="v-dtype"),
    pytest.param(_inputs(k=torch.randn(1, 3, 7, 16)), r"k must have the same batch size as q \(got 1 vs 2\)",
                 id="k-batch"),
    pytest.param(_inputs(v=torch.randn(2, 4, 7, 16)), r"v must have as many heads \(dim 1\) as k \(got 4 vs 3\)",
                 id="v-heads"),
    pytest.param(_inputs(k=torch.randn(2, 2, 7, 16), v=torch.randn(2, 2, 7, 16)),
                 r"q heads must be a multiple of k heads \(dim 1; got 3 vs 2\)", id="k-heads"),
    pytest.param(_inputs(v=torch.randn(2, 3, 6, 16)), r"v must have as many keys \(dim 2\) as k \(got 6 vs 7\)",
                 id="v-keys"),
    pytest.param(_inputs(k=torch.randn(2, 3, 7, 8)), r"k must have the same head_dim as q \(got 8 vs 16\)",
                 id="k-head_dim"),
    pytest.param(_inputs(v=torch.randn(2, 3, 7, 8)), "v must have the same head_dim as q", id="v-head_dim"),
    pytest.param(_same_head_dim(257), r"q head_dim must be in 1..256 \(got 257\)", id="q-head_dim-257"),
    pytest.param(_same_head_dim(0), r"q head_dim must be in 1..256 \(got 0\)", id="q-head_dim-0"),
]


@pytest.mark.parametrize("inputs, message", BAD_FORWARD_INPUTS)
def test_forward_checks_name_the_argument(inputs, message):
    with pytest.raises(RuntimeError, match=message):
        fwd(*inputs, False, 0.25)


def _backward_inputs(**changes):
    """Valid (dout, q, k, v, o, lse), with some replaced."""
    q, k, v = _inputs()
    tensors = {"dout": torch.randn_like(q), "q": q, "k": k, "v": v, "o": torch.randn_like(q)}
    tensors["lse"] = torch.randn(2, 3, 5)
    tensors.update(changes)
    return [tensors[name] for name in ("dout", "q", "k", "v", "o", "lse")]


BAD_BACKWARD_INPUTS = [
    pytest.param(_backward_inputs(dout=torch.randn(2, 3, 6, 16)), "dout must have the same shape as q",
                 id="dout-shape"),
    pytest.param(_backward_inputs(dout=torch.randn(2, 3, 5, 16).half()), "dout must have the same dtype as q",
                 id="dout-dtype"),
    pytest.param(_backward_inputs(o=torch.randn(2, 3, 5)), "o must have rank 4", id="o-rank"),
    pytest.param(_backward_inputs(o=torch.randn(2, 3, 5, 16).bfloat16()), "o must have the same dtype as q",
                 id="o-dtype"),
    pytest.param(_backward_inputs(lse=torch.randn(2, 3, 5).double()), "lse must be float32", id="lse-dtype"),
    pytest.param(_backward_inputs(lse=torch.randn(2, 3, 7)), r"lse must have shape \(batch, heads, seq_len_q\)",
                 id="lse-shape"),
    pytest.param(_backward_inputs(k=torch.randn(2, 3, 7, 8)), "k must have the same head_dim as q", id="k-head_dim"),
]


@pytest.mark.parametrize("inputs, message", BAD_BACKWARD_INPUTS)
def test_backward_checks_name_the_argument(inputs, message):
    with pytest.raises(RuntimeError, match=message):
        bwd(*inputs, False, 0.25)


def _varlen_inputs(batch=1, **changes):
    """Valid varlen (q, k, v) and options: two packed sequences, (2, 3) query and (3, 4) key rows."""
    q, k, v = torch.randn(batch, 3, 5, 16), torch.randn(batch, 3, 7, 16), torch.randn(batch, 3, 7, 16)
    options = {"cu_seqlens_q": torch.tensor([0, 2, 5], dtype=torch.int32),
               "cu_seqlens_k": torch.tensor([0, 3, 7], dtype=torch.int32), "max_seqlen_q": 3, "max_seqlen_k": 4}
    options.update(changes)
    return (q, k, v), options


def _padded(**changes):
    """Valid dense (q, k, v) with a key_padding_mask, replaced by changes."""
    return _inputs(), {"key_padding_mask": torch.ones(2, 7, dtype=torch.bool), **changes}


BAD_OPTIONS = [
    pytest.param(_padded(key_padding_mask=torch.ones(2, 7)), r"key_padding_mask must be bool \(got Float\)",
                 id="mask-dtype"),
    pytest.param(_padded(key_padding_mask=torch.ones(2, 6, dtype=torch.bool)),
                 r"key_padding_mask must have shape \(batch, seq_len_k\) \(2, 7\) \(got \[2, 6\]\)", id="mask-shape"),
    pytest.param(_padded(key_padding_mask=torch.ones(7, 2, dtype=torch.bool).t()),
                 "key_padding_mask must be contiguous", id="mask-strided"),
    pytest.param((_inputs(), {"cu_seqlens_q": torch.tensor([0, 5], dtype=torch.int32)}),
                 r"cu_seqlens_q and cu_seqlens_k must be given together \(got only cu_seqlens_q\)", id="cu-alone"),
    pytest.param(_varlen_inputs(cu_seqlens_k=torch.tensor([0, 3, 7])), r"cu_seqlens_k must be int32 \(got Long\)",
                 id="cu-dtype"),
    pytest.param(_varlen_inputs(cu_seqlens_q=torch.tensor([[0, 2, 5]], dtype=torch.int32)), "cu_seqlens_q must be 1-D",
                 id="cu-rank"),
    pytest.param(_varlen_inputs(cu_seqlens_q=torch.tensor([0, 9, 2, 9, 5], dtype=torch.int32)[::2]),
                 "cu_seqlens_q must be contiguous", id="cu-strided"),
    pytest.param(_varlen_inputs(cu_seqlens_k=torch.tensor([0, 7], dtype=torch.int32)),
                 r"cu_seqlens_k must have as many entries as cu_seqlens_q \(got 2 vs 3\)", id="cu-entries"),
    pytest.param(_varlen_inputs(batch=2), r"q must have batch size 1 with cu_seqlens", id="cu-batch"),
    pytest.param(_varlen_inputs(key_padding_mask=torch.ones(1, 7, dtype=torch.bool)),
                 "key_padding_mask cannot be combined with cu_seqlens_q / cu_seqlens_k", id="cu-and-mask"),
    # The values of cu_seqlens, which the CPU kernels read anyway
    pytest.param(_varlen_inputs(cu_seqlens_q=torch.tensor([1, 2, 5], dtype=torch.int32)),
                 "cu_seqlens_q must start at 0", id="cu-start"),
    pytest.param(_varlen_inputs(cu_seqlens_k=torch.tensor([0, 3, 6], dtype=torch.int32)),
                 r"cu_seqlens_k must end at the total number of rows 7 \(got 6\)", id="cu-end"),
    pytest.param(_varlen_inputs(cu_seqlens_q=torch.tensor([0, 3, 2, 5], dtype=torch.int32),
                                cu_seqlens_k=torch.tensor([0, 3, 5, 7], dtype=torch.int32)),
                 r"cu_seqlens_q must be non-decreasing \(entry 2 is 2 after 3\)", id="cu-decreasing"),
    pytest.param(_varlen_inputs(max_seqlen_q=2),
                 r"max_seqlen_q \(2\) is shorter than sequence 1 of cu_seqlens_q \(3 rows\)", id="max-seqlen"),
]


@pytest.mark.parametrize("inputs, message", BAD_OPTIONS)
def test_option_checks_name_the_argument(inputs, message):
    (q, k, v), options = inputs
    with pytest.raises(RuntimeError, match=message):
        fwd(q, k, v, False, 0.25, **options)
    dout, o, lse = torch.randn_like(q), torch.randn_like(q), torch.randn(q.shape[:3])
    with pytest.raises(RuntimeError, match=message):
        bwd(dout, q, k, v, o, lse, False, 0.25, **options)


# ---------------------------------------------------------------------------------------------
# Sliding windows, softcap, ALiBi and dropout (issue 11), against attention.naive_attention in float64


def public_reference(q, k, v, dout, causal, scale, dtype, key_padding_mask=None, dropout_seed=0, **options):
    """o, lse, dq, dk, dv of attention.naive_attention in dtype (autograd for the gradients), with the dropout mask
    of attention.dropout_mask(p, dropout_seed, offset 0) when options hold a dropout_p."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    p = options.get("dropout_p", 0.0)
    mask = attention.dropout_mask(p, dropout_seed, 0, *q.shape[:3], k.shape[2]) if p > 0 else None
    o, lse = attention.naive_attention(q, k, v, causal, scale, return_lse=True, key_padding_mask=key_padding_mask,
                                       dropout_mask=mask, **options)
    o.backward(dout.to(dtype))
    return o.detach(), lse.detach(), q.grad, k.grad, v.grad


def public_reference_varlen(q, k, v, dout, cu_q, cu_k, causal, scale, dtype, dropout_seed=0, **options):
    """The same for packed (1, H, total, D) inputs, through attention.reference.naive_attention_varlen."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    p = options.get("dropout_p", 0.0)
    lengths_q, lengths_k = (torch.diff(cu).tolist() for cu in (cu_q, cu_k))
    mask = (attention.dropout_mask(p, dropout_seed, 0, len(lengths_q), q.shape[1], max(lengths_q), max(lengths_k))
            if p > 0 else None)
    packed_rows = lambda x: x[0].transpose(0, 1)  # (1, H, total, D) -> (total, H, D)
    o, lse = naive_attention_varlen(*map(packed_rows, (q, k, v)), cu_q, cu_k, causal, scale,
                                    return_lse=True, dropout_mask=mask, **options)
    o.backward(packed_rows(dout.to(dtype)))
    return o.detach().transpose(0, 1)[None], lse.detach()[None], q.grad, k.grad, v.grad


def run_options(q, k, v, dout, causal, scale, key_padding_mask=None, varlen=(None, None, 0, 0), **options):
    """Our o, lse and gradients with the options of issue 11 (window, softcap, alibi_slopes, dropout_p / _seed)."""
    o, lse = fwd(q, k, v, causal, scale, key_padding_mask, *varlen, **options)
    return o, lse, bwd(dout, q, k, v, o, lse, causal, scale, key_padding_mask, *varlen, **options)


def assert_options_match(q, k, v, dout, causal, scale, key_padding_mask=None, **options):
    o, lse, grads = run_options(q, k, v, dout, causal, scale, key_padding_mask, **options)
    reference = functools.partial(public_reference, q, k, v, dout, causal, scale, key_padding_mask=key_padding_mask,
                                  **options)
    assert_matches(reference, q.dtype, o, lse, grads)
    return o, lse, grads


# Windows (left, right): both sides bounded, a single key (i + shift only), one side unbounded, one side wider
# than the 64-key tiles, and bounds that reach past every key.
WINDOWS = [(5, 3), (0, 0), (10, -1), (-1, 7), (70, 2), (200, 300)]


@pytest.mark.parametrize("n_q, n_k", [(150, 170), (170, 130)], ids=["nq<nk", "nq>nk"])
@pytest.mark.parametrize("window", WINDOWS, ids=str)
def test_window(window, n_q, n_k):
    q, k, v, dout = random_inputs((1, 2, n_q, n_k, 16), torch.float32, seed=n_q)
    assert_options_match(q, k, v, dout, False, 0.3, window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_window_with_causal_gqa_and_padding(dtype):
    q, k, v, dout = random_inputs((4, 4, 65, 150, 16), dtype, kv_heads=2)
    mask = padding_masks(150)
    o, lse, grads = assert_options_match(q, k, v, dout, True, 0.3, mask, window=(40, 0))
    assert torch.equal(o[3], torch.zeros_like(o[3])) and (lse[3] == -math.inf).all()


def test_window_that_hides_nothing_is_the_plain_path():
    """Bounds at or past every key run the plain loops: the same bits; a right bound 0 is causal."""
    q, k, v, dout = random_inputs((1, 2, 70, 90, 16), torch.float32)
    plain = run_options(q, k, v, dout, False, 0.3)
    for window in [(89, 69), (1000, -1), (-1, 1000)]:
        ours = run_options(q, k, v, dout, False, 0.3, window=window)
        assert torch.equal(ours[0], plain[0]) and torch.equal(ours[1], plain[1])
        assert all(torch.equal(a, b) for a, b in zip(ours[2], plain[2]))
    causal = run_options(q, k, v, dout, True, 0.3)
    right_bound_0 = torch.ops.fused_attention.fwd(q, k, v, False, 0.3, None, None, None, 0, 0, -1, 0, 0.0, None, 0.0,
                                                  0, 0)
    assert torch.equal(right_bound_0[0], causal[0]) and torch.equal(right_bound_0[1], causal[1])


def test_window_hides_every_key_of_some_rows():
    """Rows whose window holds no key (before the first key; onto padding keys) give o 0, lse -inf, dq 0."""
    q, k, v, dout = random_inputs((2, 2, 100, 40, 16), torch.float32)
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 10:20] = False
    o, lse, (dq, dk, dv) = assert_options_match(q, k, v, dout, False, 0.3, mask, window=(0, 0))
    # Query i sees key i - 60 alone: none for i < 60, and in batch element 1 none for 70 <= i < 80.
    blind = torch.zeros(2, 100, dtype=torch.bool)
    blind[:, :60] = True
    blind[1, 70:80] = True
    blind = blind[:, None, :].expand(lse.shape)
    assert (lse[blind] == -math.inf).all() and torch.isfinite(lse[~blind]).all()
    assert not o[blind].any() and not dq[blind].any()
    assert not dk[1, :, 10:20].any() and not dv[1, :, 10:20].any()


def test_window_skips_tiles_outside_it():
    """The tiles outside every window of a tile are never read: NaN there leaves the results of the rows whose tiles
    do not reach it bit-for-bit those of clean inputs. 64-row tiles, window (10, 10): the query tile [128, 192) sees
    the keys [118, 202) alone, the key tile [128, 192) is seen by the queries [118, 202) alone."""
    q, k, v, dout = random_inputs((1, 2, 320, 320, 16), torch.float32)
    o, lse, (dq, dk, dv) = run_options(q, k, v, dout, False, 0.3, window=(10, 10))
    poisoned_v, poisoned_dout = v.clone(), dout.clone()
    poisoned_v[:, :, [10, 300]] = math.nan  # in key tiles 0 and 4
    poisoned_dout[:, :, [10, 300]] = math.nan  # in query tiles 0 and 4
    o_poisoned, lse_poisoned = fwd(q, k, poisoned_v, False, 0.3, window=(10, 10))
    dq_poisoned, dk_poisoned, dv_poisoned = bwd(poisoned_dout, q, k, v, o, lse, False, 0.3, window=(10, 10))
    middle = slice(128, 192)
    assert torch.equal(o_poisoned[:, :, middle], o[:, :, middle]) and torch.equal(lse_poisoned, lse)
    assert torch.equal(dk_poisoned[:, :, middle], dk[:, :, middle])
    assert torch.equal(dv_poisoned[:, :, middle], dv[:, :, middle])
    # Rows that see a poisoned key (forward) or are seen by a poisoned query (backward) do turn NaN: the
    # poison is where it should be read.
    assert o_poisoned[:, :, 5].isnan().all() and dv_poisoned[:, :, 5].isnan().all()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softcap(causal, dtype):
    """Scores up to about 40 against a cap of 5: tanh saturates, and its derivative vanishes there."""
    q, k, v, dout = random_inputs((2, 2, 70, 90, 16), dtype)
    assert_options_match(q * 4, k, v, dout, causal, 0.5, softcap=5.0)


def test_softcap_with_gqa_and_padding():
    q, k, v, dout = random_inputs((4, 4, 65, 150, 16), torch.float32, kv_heads=1)
    assert_options_match(q * 4, k, v, dout, False, 0.5, padding_masks(150), softcap=2.0)


@pytest.mark.parametrize("per_batch", [False, True], ids=["per-head", "per-batch-and-head"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_alibi(causal, per_batch):
    """The op takes (B, Hq) slopes; per head is the same row for every batch element."""
    q, k, v, dout = random_inputs((2, 4, 70, 90, 16), torch.float32, kv_heads=2)
    slopes = 2.0 ** -torch.arange(1.0, 5.0)  # BLOOM's geometric slopes, one per head
    slopes = slopes * torch.tensor([[1.0], [0.3]]) if per_batch else slopes.expand(2, 4).contiguous()
    assert_options_match(q, k, v, dout, causal, 0.3, alibi_slopes=slopes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).removeprefix("torch."))
def test_alibi_with_padding(dtype):
    q, k, v, dout = random_inputs((4, 2, 65, 150, 16), dtype)
    slopes = torch.rand(4, 2, generator=torch.Generator().manual_seed(3))
    assert_options_match(q, k, v, dout, False, 0.3, padding_masks(150), alibi_slopes=slopes)


def test_dropout_mask_is_philox():
    """Uniform probabilities 1 / Nk and v the identity make o[i, j] = keep_ij / ((1 - p) Nk): the kernel's keep-mask,
    read off exactly, is attention.dropout_mask's (several key groups of 4 per tile, several heads and queries)."""
    batch, heads, n_q, n_k, p, seed = 2, 3, 70, 90, 0.3, 2**40 + 12345
    q = torch.zeros(batch, heads, n_q, n_k)
    v = torch.eye(n_k).expand(batch, 1, n_k, n_k)
    k = torch.zeros_like(v)
    o, lse = fwd(q, k, v, False, 1.0, dropout_p=p, dropout_seed=seed, dropout_offset=7)
    expected = attention.dropout_mask(p, seed, 7, batch, heads, n_q, n_k)
    assert torch.equal(o != 0, expected)
    torch.testing.assert_close(o[expected], torch.full_like(o[expected], 1 / ((1 - p) * n_k)))
    assert torch.allclose(lse, torch.full_like(lse, math.log(n_k)))  # lse ignores dropout


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout(causal, dtype):
    q, k, v, dout = random_inputs((2, 4, 70, 90, 16), dtype, kv_heads=2)
    assert_options_match(q, k, v, dout, causal, 0.3, dropout_p=0.2, dropout_seed=11)


def test_dropout_with_padding():
    q, k, v, dout = random_inputs((4, 2, 65, 150, 16), torch.float32)
    assert_options_match(q, k, v, dout, False, 0.3, padding_masks(150), dropout_p=0.5, dropout_seed=3)


def test_dropout_seeds():
    """One seed gives one result, run after run; another seed another; p = 0 ignores the seed."""
    q, k, v, dout = random_inputs((1, 2, 70, 90, 16), torch.float32)
    first, again, other = (run_options(q, k, v, dout, False, 0.3, dropout_p=0.3, dropout_seed=s) for s in (1, 1, 2))
    assert torch.equal(first[0], again[0]) and all(torch.equal(a, b) for a, b in zip(first[2], again[2]))
    assert not torch.equal(first[0], other[0])
    plain, seeded = run_options(q, k, v, dout, False, 0.3), run_options(q, k, v, dout, False, 0.3, dropout_seed=5)
    assert torch.equal(plain[0], seeded[0])


ALL_OPTIONS = {"window": (30, 5), "softcap": 3.0, "dropout_p": 0.25, "dropout_seed": 9}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_option_with_gqa_and_padding(dtype):
    q, k, v, dout = random_inputs((4, 4, 100, 150, 16), dtype, kv_heads=2)
    slopes = torch.rand(4, 4, generator=torch.Generator().manual_seed(4))
    assert_options_match(q * 2, k, v, dout, False, 0.3, padding_masks(150), alibi_slopes=slopes, **ALL_OPTIONS)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_every_option_varlen(dtype, causal):
    """Packed sequences: positions, ALiBi slopes and the dropout mask counted per sequence."""
    lengths_q, lengths_k = zip(*VARLEN_LENGTHS)
    q, dout = (packed(lengths_q, 4, 16, dtype, seed) for seed in (0, 1))
    k, v = (packed(lengths_k, 2, 16, dtype, seed) for seed in (2, 3))
    cu_q, cu_k = cu_seqlens(lengths_q), cu_seqlens(lengths_k)
    slopes = torch.rand(len(lengths_q), 4, generator=torch.Generator().manual_seed(5))
    options = {**ALL_OPTIONS, "alibi_slopes": slopes}
    o, lse, grads = run_options(q * 2, k, v, dout, causal, 0.3, None, (cu_q, cu_k, max(lengths_q), max(lengths_k)),
                                **options)
    reference = functools.partial(public_reference_varlen, q * 2, k, v, dout, cu_q, cu_k, causal, 0.3, **options)
    assert_matches(reference, dtype, o, lse, grads)


def test_options_repeatable_bit_for_bit():
    """With every option on, the backward stays deterministic: the same bits run after run at a thread count."""
    q, k, v, dout = random_inputs((1, 2, 300, 280, 32), torch.float32, kv_heads=1)
    slopes = torch.rand(1, 2)
    runs = [run_options(q, k, v, dout, False, 0.2, alibi_slopes=slopes, **ALL_OPTIONS) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip([*runs[0][:2], *runs[0][2]], [*runs[1][:2], *runs[1][2]]))


BAD_SCORE_OPTIONS = [
    pytest.param({"window": (-2, 0)}, "window_left and window_right must be >= -1", id="window"),
    pytest.param({"softcap": -1.0}, "softcap must be finite and >= 0", id="softcap-negative"),
    pytest.param({"softcap": math.inf}, "softcap must be finite and >= 0", id="softcap-inf"),
    pytest.param({"dropout_p": 1.0}, r"dropout_p must be in \[0, 1\)", id="dropout_p"),
    pytest.param({"dropout_p": 0.1, "dropout_seed": -1}, "dropout_seed must be >= 0", id="dropout_seed"),
    pytest.param({"dropout_offset": 2**32}, r"dropout_offset must be in \[0, 2\^32\)", id="dropout_offset"),
    pytest.param({"alibi_slopes": torch.ones(3)}, r"alibi_slopes must have shape \(batch, heads\) \(2, 3\)",
                 id="alibi-shape"),
    pytest.param({"alibi_slopes": torch.ones(2, 3).double()}, "alibi_slopes must be float32", id="alibi-dtype"),
    pytest.param({"alibi_slopes": torch.ones(3, 2).t()}, "alibi_slopes must be contiguous", id="alibi-strided"),
]


@pytest.mark.parametrize("options, message", BAD_SCORE_OPTIONS)
def test_score_option_checks_name_the_argument(options, message):
    q, k, v = _inputs()
    with pytest.raises(RuntimeError, match=message):
        fwd(q, k, v, False, 0.25, **options)
    dout, o, lse = torch.randn_like(q), torch.randn_like(q), torch.randn(q.shape[:3])
    with pytest.raises(RuntimeError, match=message):
        bwd(dout, q, k, v, o, lse, False, 0.25, **options)


def test_varlen_alibi_slopes_are_per_sequence():
    (q, k, v), options = _varlen_inputs()
    with pytest.raises(RuntimeError, match=r"alibi_slopes must have shape \(batch, heads\) \(2, 3\)"):
        fwd(q, k, v, False, 0.25, **options, alibi_slopes=torch.ones(1, 3))


def test_softcap_tanh_is_accurate_across_its_range():
    """One query against keys whose capped scores are tanh(x) for x in [-12, 12] (both of the kernel's tanh
    formulas, and saturation): lse within float rounding of the float64 value."""
    x = torch.linspace(-12, 12, 4001)
    q, k, v = torch.ones(1, 1, 1, 1), x.reshape(1, 1, -1, 1), torch.ones(1, 1, x.numel(), 1)
    _, lse = fwd(q, k, v, False, 1.0, softcap=1.0)
    assert abs(lse.item() - torch.logsumexp(torch.tanh(x.double()), 0).item()) < 1e-6


# fwd_kvcache (issue 13): what the shared grid (tests/test_kvcache.py) leaves to the C++ kernel's own tiling.

def fwd_kvcache(q, k_cache, v_cache, seqlens_k, block_table=None, causal=True, scale=0.25, window=(-1, -1),
                num_splits=1):
    return torch.ops.fused_attention.fwd_kvcache(q, k_cache, v_cache, seqlens_k, block_table, causal, scale,
                                                 window[0], 0 if causal else window[1], 0.0, None, num_splits)


def paged(cache, block_size, gen):
    """cache (B, Hkv, N, D), N a multiple of block_size, as a pool of shuffled blocks (plus one spare, NaN) and
    its block table."""
    batch, kv_heads, n, head_dim = cache.shape
    blocks = n // block_size
    order = torch.randperm(batch * blocks + 1, generator=gen)[:batch * blocks]
    pool = torch.full((batch * blocks + 1, kv_heads, block_size, head_dim), math.nan, dtype=cache.dtype)
    pool[order] = cache.unflatten(2, (blocks, block_size)).transpose(1, 2).flatten(0, 1)
    return pool, order.to(torch.int32).reshape(batch, blocks)


@pytest.mark.parametrize("heads, kv_heads, n_q", [(4, 2, 70), (40, 1, 1)], ids=["tiled-queries", "wide-group"])
def test_kvcache_tiles_queries_groups_and_blocks(heads, kv_heads, n_q):
    """Block sizes that cut key tiles in runs (1, 5) or hold several tiles (80); more query rows than one tile
    takes per head (70 rows, group 2), and a group of 40 heads packed as one tile's rows; 3 splits."""
    gen = torch.Generator().manual_seed(7)
    lengths = torch.tensor([150, 71], dtype=torch.int32)
    q = torch.randn(2, heads, n_q, 16, generator=gen)
    k, v = (torch.randn(2, kv_heads, 160, 16, generator=gen) for _ in range(2))
    for t in (k, v):
        t[0, :, 150:], t[1, :, 71:] = math.nan, math.nan
    ref_o, ref_lse = naive_attention_with_kvcache(q.double(), k.double(), v.double(), lengths, softmax_scale=0.25,
                                                  return_lse=True)
    hidden = ref_lse.isinf()  # sequence 1's first rows: bottom-right causal with n_q > 71
    for block_size in (1, 5, 80):
        (k_pool, table), (v_pool, _) = (paged(t, block_size, torch.Generator().manual_seed(1)) for t in (k, v))
        o, lse = merge_partials(*fwd_kvcache(q, k_pool, v_pool, lengths, table, num_splits=3))
        assert torch.equal(lse.isinf(), hidden) and torch.equal(o[hidden], torch.zeros_like(o[hidden])), block_size
        assert max_err(o, ref_o) < 1e-5 and max_err(lse[~hidden], ref_lse[~hidden]) < 1e-5, block_size


def test_kvcache_key_tiles_outside_the_window_are_skipped():
    """Keys in whole tiles that no query's window reaches are never read: NaN there changes nothing."""
    gen = torch.Generator().manual_seed(8)
    q = torch.randn(1, 2, 2, 16, generator=gen)
    k, v = (torch.randn(1, 1, 300, 16, generator=gen) for _ in range(2))
    lengths = torch.tensor([300], dtype=torch.int32)
    expected = fwd_kvcache(q, k, v, lengths, window=(40, 0), num_splits=2)
    for t in (k, v):
        t[:, :, :256] = math.nan  # key tiles 0..3; the rows see keys 258..299
    got = fwd_kvcache(q, k, v, lengths, window=(40, 0), num_splits=2)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert torch.isfinite(got[0]).all() and (got[1][0] == -math.inf).all()  # part 0 (keys 0..191) sees none


def test_kvcache_value_checks_name_the_argument():
    q, cache = torch.randn(2, 2, 1, 8), torch.randn(3, 1, 4, 8)
    table = torch.tensor([[0, 1], [3, 0]], dtype=torch.int32)  # block 3 is not in the cache
    with pytest.raises(RuntimeError, match=r"seqlens_k\[1\] = 9 is outside the cache's 0..8 positions"):
        fwd_kvcache(q, cache, cache, torch.tensor([8, 9], dtype=torch.int32), table)
    with pytest.raises(RuntimeError, match=r"block_table\[1, 0\] = 3 is outside the cache's 3 blocks"):
        fwd_kvcache(q, cache, cache, torch.tensor([8, 2], dtype=torch.int32), table)
    fwd_kvcache(q, cache, cache, torch.tensor([8, 0], dtype=torch.int32), table)  # sequence 1 uses no block
