"""The C++ CPU kernels, called as the raw ops torch.ops.fused_attention.fwd / .bwd.

Held against a plain-torch float64 reference written here (the public API goes through the shared grid):
odd lengths, Nq != Nk both ways, bottom-right causal masks, head dims up to 256, fp32 / bf16 / fp16,
strided and NaN-padded inputs, rows that see no key, determinism, and the C++ input checks.
"""
import math

import pytest
import torch

from grid import assert_within_rule, max_err

pytest.importorskip("attention._C", reason="the C++ extension attention._C is not built")



def fwd(q, k, v, causal, scale, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0,
        max_seqlen_k=0):
    """The raw forward op, with the options of issue 10 defaulting to off."""
    return torch.ops.fused_attention.fwd(q, k, v, causal, scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                         max_seqlen_q, max_seqlen_k)


def bwd(dout, q, k, v, o, lse, causal, scale, key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None,
        max_seqlen_q=0, max_seqlen_k=0):
    """The raw backward op, with the options of issue 10 defaulting to off."""
    return torch.ops.fused_attention.bwd(dout, q, k, v, o, lse, causal, scale, key_padding_mask, cu_seqlens_q,
                                         cu_seqlens_k, max_seqlen_q, max_seqlen_k)


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


def random_inputs(shape, dtype, seed=0):
    """q, k, v and an output gradient dout, drawn in float32 then rounded to dtype."""
    batch, heads, n_q, n_k, head_dim = shape
    gen = torch.Generator().manual_seed(seed)
    sizes = [n_q, n_k, n_k, n_q]
    return [torch.randn(batch, heads, n, head_dim, generator=gen).to(dtype) for n in sizes]


def naive(q, k, v, dout, causal, scale, dtype):
    """o, lse, dq, dk, dv of softmax(scale q k^T) v computed in dtype, masked bottom-right when causal."""
    q, k, v = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    scores = (q @ k.transpose(-2, -1)) * scale
    n_q, n_k = scores.shape[-2:]
    hidden = torch.zeros(n_q, n_k, dtype=torch.bool)
    if causal:
        hidden = torch.arange(n_k)[None, :] > torch.arange(n_q)[:, None] + (n_k - n_q)
    # A row that sees no key would softmax to NaN: give it finite scores, then zero its weights.
    no_key = hidden.all(-1, keepdim=True)
    scores = scores.masked_fill(hidden & ~no_key, -math.inf).masked_fill(no_key, 0.0)
    p = torch.softmax(scores, dim=-1).masked_fill(no_key, 0.0)
    o = p @ v
    lse = torch.logsumexp(scores.double(), dim=-1).masked_fill(no_key.squeeze(-1), -math.inf)
    o.backward(dout.to(dtype))
    return o.detach(), lse, q.grad, k.grad, v.grad


def assert_close_to_reference(q, k, v, dout, causal, scale, o, lse, grads):
    """The tolerance rule: max|ours - ref| <= 2 x (3 x for gradients) max|same math in q's dtype - ref| + 1e-5."""
    ref = naive(q, k, v, dout, causal, scale, torch.float64)
    low = naive(q, k, v, dout, causal, scale, q.dtype)
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
    """With one key, o = v: every fp16 / bf16 bit pattern (subnormals, inf, NaN) survives the kernel's conversions."""
    v = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype).reshape(1, 256, 1, 256)
    q = k = torch.zeros_like(v)
    o, _ = fwd(q, k, v, False, 1.0)
    assert torch.equal(o.isnan(), v.isnan())
    assert torch.equal(o.nan_to_num(), v.nan_to_num())  # -0.0 may come back as +0.0: equal values


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


def test_repeatable_bit_for_bit():
    """Every result is the same from run to run at a given thread count; o, lse, dk and dv at any thread count.

    dq is summed from per-thread buffers, so its rounding depends on how many threads share a head's key tiles:
    one head here, so that they do.
    """
    q, k, v, dout = random_inputs((1, 1, 300, 280, 64), torch.float32)
    first = {}
    for threads in (1, 2, 3, 2):
        results = run_with_threads(threads, q, k, v, dout, True, 0.125)
        first.setdefault(threads, results)
        assert all(torch.equal(a, b) for a, b in zip(results, first[threads]))
        o, lse, dq, dk, dv = results
        o1, lse1, dq1, dk1, dv1 = first[1]
        assert torch.equal(o, o1) and torch.equal(lse, lse1) and torch.equal(dk, dk1) and torch.equal(dv, dv1)
        torch.testing.assert_close(dq, dq1, rtol=1e-5, atol=1e-6)


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
