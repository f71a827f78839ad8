"""The public contract: validation, backend choice, SDPA drop-in semantics, the naive reference, op registration."""
import re

import pytest
import torch
import torch.nn.functional as F

import attention
from attention.nn import MultiHeadAttention
from attention.reference import causal_mask, naive_attention_varlen
from grid import DEVICE, EMULATED_CUDA, backends_under_test


def qkv(n_q=8, n_k=8, head_dim=16, dtype=torch.float32, batch=2, heads=3):
    make = lambda n: torch.randn(batch, heads, n, head_dim, device=DEVICE, dtype=dtype)
    return make(n_q), make(n_k), make(n_k)


# ---- validation: a clear Python error naming the argument, before anything runs

BAD_CALLS = [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must have rank 4"),
    (lambda q, k, v: (q, k[0], v), ValueError, r"k must have rank 4"),
    (lambda q, k, v: (q, k, v.double()), TypeError, r"v must be float16, bfloat16 or float32"),
    (lambda q, k, v: (q.int(), k, v), TypeError, r"q must be float16"),
    (lambda q, k, v: (q, k.half(), v), TypeError, r"k has dtype torch.float16 but q has torch.float32"),
    (lambda q, k, v: (q, k, v[:1]), ValueError, r"v has batch 1 but q has 2"),
    (lambda q, k, v: (q, k[:, :2], v[:, :2]), ValueError, r"q has 3 heads, not a multiple of the 2 heads of k"),
    (lambda q, k, v: (q, k[:, :1], v), ValueError, r"v has 3 heads but k has 1"),
    (lambda q, k, v: (q, k, v[:, :, :5]), ValueError, r"v has 5 keys \(dim 2\) but k has 8"),
    (lambda q, k, v: (q, k[..., :8], v), ValueError, r"k has head_dim 8 but q has 16"),
    (lambda q, k, v: (q, k, v[..., :8]), ValueError, r"v has head_dim 8 but q has 16"),
    (lambda q, k, v: ([q], k, v), TypeError, r"q must be a torch.Tensor"),
]


@pytest.mark.parametrize("make_bad,error,message", BAD_CALLS)
def test_bad_inputs_raise_naming_the_argument(make_bad, error, message):
    with pytest.raises(error, match=message):
        attention.flash_attention(*make_bad(*qkv()))


def test_head_dim_limit():
    with pytest.raises(ValueError, match=r"q has head_dim 320: supported head dims are 1..256"):
        attention.flash_attention(*qkv(head_dim=320))


def test_bad_options():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"backend must be 'auto' or one of"):
        attention.flash_attention(q, k, v, backend="flash")
    with pytest.raises(TypeError, match=r"causal must be a bool"):
        attention.flash_attention(q, k, v, causal="yes")
    with pytest.raises(TypeError, match=r"softmax_scale must be a float or None"):
        attention.flash_attention(q, k, v, softmax_scale="0.1")
    with pytest.raises(ValueError, match=r"softmax_scale must be finite"):
        attention.flash_attention(q, k, v, softmax_scale=float("nan"))


@pytest.mark.skipif(DEVICE != "cpu", reason="a CPU tensor sent to the CUDA-only backend")
def test_explicit_backend_that_cannot_run_says_why():
    with pytest.raises(RuntimeError, match=r"backend='cuda' cannot run this call"):
        attention.flash_attention(*qkv(), backend="cuda")


def test_cross_device_inputs_raise():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device to put one input elsewhere")
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"k is on cpu but q is on cuda"):
        attention.flash_attention(q, k.cpu(), v)


# ---- backend choice


def test_explain_names_the_choice_and_the_reasons():
    q, k, v = qkv()
    choice = attention.explain(q, k, v)
    assert choice.backend in attention.available_backends(DEVICE)
    assert choice.backend == attention.explain(q, k, v, backend=choice.backend).backend
    for name, reasons in choice.passed_over.items():
        assert reasons and all(isinstance(r, str) and r for r in reasons), name
    assert f"backend: {choice.backend}" in str(choice)


def test_auto_falls_back_to_naive_for_empty_inputs():
    q, k, v = qkv(n_k=0)
    assert attention.explain(q, k, v).backend == "naive"
    o = attention.flash_attention(q, k, v)
    assert o.shape == q.shape and torch.all(o == 0)


def test_available_backends_always_include_naive():
    assert "naive" in attention.available_backends(DEVICE)
    assert set(attention.available_backends(DEVICE)) <= set(attention.BACKENDS)


@pytest.mark.parametrize("backend", attention.available_backends(DEVICE))
def test_lse_has_no_gradient_on_every_backend(backend):
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32  # the cuda backend takes 16-bit only
    q, k, v = (t.requires_grad_() for t in qkv(dtype=dtype))
    o, lse = attention.flash_attention(q, k, v, backend=backend, return_lse=True)
    assert o.requires_grad and not lse.requires_grad and lse.grad_fn is None


# ---- scaled_dot_product_attention: SDPA's signature and meaning


@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_drop_in_matches_torch(is_causal):
    q, k, v = qkv(n_q=33, n_k=33)
    assert attention.explain_sdpa(q, k, v, is_causal=is_causal).backend is not None
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.2)
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=0.2), expected)


SDPA_FALLBACKS = [
    (dict(attn_mask="mask"), "is not a boolean key-padding mask"),
    (dict(attn_mask="float"), "is not a boolean key-padding mask"),
    (dict(dropout_p=1.0), "dropout_p=1.0 is not a float in"),
    (dict(is_causal=True, n_q=5, n_k=9), "top-left"),
    (dict(kv_heads=1), "key has 1 heads and query 3, but enable_gqa is False"),
    (dict(dtype=torch.float64), "query must be float16, bfloat16 or float32"),
]


@pytest.mark.parametrize("case,reason", SDPA_FALLBACKS,
                         ids=["mask", "float-mask", "dropout", "causal-nq-ne-nk", "heads-without-gqa", "float64"])
def test_sdpa_falls_back_to_torch_and_says_so(case, reason):
    case = dict(case)
    n_q, n_k, kv_heads = case.pop("n_q", 8), case.pop("n_k", 8), case.pop("kv_heads", 3)
    dtype = case.pop("dtype", torch.float32)
    q, k, v = qkv(n_q, n_k, dtype=dtype)
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    if case.get("attn_mask") == "mask":
        case["attn_mask"] = torch.rand(n_q, n_k, device=DEVICE) > 0.3
    if case.get("attn_mask") == "float":
        case["attn_mask"] = torch.zeros(2, 1, 1, n_k, device=DEVICE)
    explanation = attention.explain_sdpa(q, k, v, **case)
    assert explanation.backend is None and any(re.search(reason, r) for r in explanation.torch_fallback), explanation
    torch.manual_seed(0)
    ours = attention.scaled_dot_product_attention(q, k, v, **case)
    torch.manual_seed(0)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, **case))


@pytest.mark.parametrize("mask_shape", [(2, 1, 1, 11), (1, 1, 11), (1, 11), (2, 1, 1, 1)])
def test_sdpa_key_padding_masks_run_on_our_kernels(mask_shape):
    """A boolean attn_mask broadcastable to (B, 1, 1, Nk), with grouped heads, as Hugging Face models pass it."""
    q, k, v = qkv(n_q=7, n_k=11, heads=4)
    k, v = k[:, :2], v[:, :2]
    mask = torch.rand(mask_shape, device=DEVICE) > 0.3
    mask.view(-1)[0] = True  # every row keeps a key: torch's SDPA gives NaN for rows that see none
    if mask_shape[-1] == 1:
        mask[:] = True
    args = dict(attn_mask=mask, enable_gqa=True, scale=0.3)
    explanation = attention.explain_sdpa(q, k, v, **args)
    assert explanation.backend is not None, explanation
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, **args),
                               F.scaled_dot_product_attention(q, k, v, **args))


def test_sdpa_fully_masked_rows_give_zero():
    q, k, v = qkv(n_q=5, n_k=6)
    mask = torch.tensor([True, False], device=DEVICE)[:, None, None, None].expand(2, 1, 1, 6)
    o = attention.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert torch.all(o[1] == 0) and not o.isnan().any()


def test_explain_sdpa_names_sdpa_arguments():
    q, k, v = qkv()
    for bad, message in ((dict(query=q[0]), r"query must have rank 4"), (dict(key=k.half()), r"key has dtype"),
                         (dict(scale="x"), r"scale must be a float"), (dict(value=v[:, :, :3]), r"value has 3 keys")):
        args = dict(query=q, key=k, value=v) | bad
        reasons = attention.explain_sdpa(**args).torch_fallback
        assert any(re.search(message, r) for r in reasons), reasons


def test_explain_on_cpu_says_why_triton_and_cuda_were_passed_over():
    q, k, v = qkv()
    choice = attention.explain(q.cpu(), k.cpu(), v.cpu())
    assert {"triton", "cuda"} <= set(choice.passed_over), choice
    assert "triton:" in str(choice) and "cuda:" in str(choice)


def test_scale_is_an_alias_of_softmax_scale():
    q, k, v = qkv()
    torch.testing.assert_close(attention.flash_attention(q, k, v, scale=0.3),
                               attention.flash_attention(q, k, v, softmax_scale=0.3))
    with pytest.raises(ValueError, match=r"softmax_scale=0.2 and scale=0.3 disagree"):
        attention.flash_attention(q, k, v, softmax_scale=0.2, scale=0.3)
    with pytest.raises(ValueError, match=r"scale must be finite"):
        attention.flash_attention(q, k, v, scale=float("inf"))


BAD_PADDING = [
    (lambda m: m.float(), TypeError, r"key_padding_mask must be a bool tensor"),
    (lambda m: m[:, :5], ValueError, r"key_padding_mask must have shape \(batch, Nk\) = \(2, 8\), got \(2, 5\)"),
    (lambda m: m[None], ValueError, r"key_padding_mask must have shape"),
    (lambda m: m.tolist(), TypeError, r"key_padding_mask must be a torch.Tensor or None"),
]


@pytest.mark.parametrize("make_bad,error,message", BAD_PADDING)
def test_bad_key_padding_mask(make_bad, error, message):
    q, k, v = qkv()
    with pytest.raises(error, match=message):
        attention.flash_attention(q, k, v, key_padding_mask=make_bad(torch.ones(2, 8, dtype=torch.bool, device=DEVICE)))


def varlen_args(lengths=(3, 0, 5), heads=2, head_dim=16):
    total = sum(lengths)
    q, k, v = (torch.randn(total, heads, head_dim, device=DEVICE) for _ in range(3))
    cu = torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
    return [q, k, v, cu, cu.clone(), max(lengths), max(lengths)]


BAD_VARLEN = [
    (3, lambda cu: cu.long(), TypeError, r"cu_seqlens_q must be int32, got torch.int64"),
    (4, lambda cu: cu.long(), TypeError, r"cu_seqlens_k must be int32"),
    (3, lambda cu: cu.flip(0), ValueError, r"cu_seqlens_q must start at 0"),
    (4, lambda cu: torch.tensor([0, 5, 3, 8], dtype=torch.int32, device=DEVICE), ValueError,
     r"cu_seqlens_k must be non-decreasing"),
    (3, lambda cu: cu[:-1], ValueError, r"cu_seqlens_q has 3 entries but cu_seqlens_k has 4"),
    (3, lambda cu: torch.tensor([0, 3, 3, 7], dtype=torch.int32, device=DEVICE), ValueError,
     r"cu_seqlens_q ends at 7 but there are 8 tokens"),
    (3, lambda cu: cu[None], ValueError, r"cu_seqlens_q must have shape \(batch \+ 1,\)"),
    (3, lambda cu: cu.tolist(), TypeError, r"cu_seqlens_q must be a torch.Tensor"),
    (5, lambda n: 4, ValueError, r"max_seqlen_q=4 is below the longest sequence in cu_seqlens_q \(5\)"),
    (6, lambda n: -1, TypeError, r"max_seqlen_k must be a non-negative int"),
    (0, lambda q: q[None], ValueError, r"q must have rank 3 \(total_tokens, heads, head_dim\)"),
    (2, lambda v: v[:4], ValueError, r"v has 4 tokens \(dim 0\) but k has 8"),
]


@pytest.mark.parametrize("position,make_bad,error,message", BAD_VARLEN)
def test_bad_varlen_arguments(position, make_bad, error, message):
    args = varlen_args()
    args[position] = make_bad(args[position])
    with pytest.raises(error, match=message):
        attention.flash_attention_varlen(*args)


# ---- the naive reference, checked against torch's own math


@pytest.mark.parametrize("n_q,n_k", [(1, 1), (17, 17), (9, 30), (30, 9)])
@pytest.mark.parametrize("causal", [False, True])
def test_naive_matches_torch_math(n_q, n_k, causal):
    q, k, v = (t.double() for t in qkv(n_q, n_k, head_dim=24))
    mask = ~causal_mask(n_q, n_k, DEVICE) if causal else None
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o, lse = attention.naive_attention(q, k, v, causal=causal, return_lse=True)
    seen = (mask.any(-1) if causal else torch.ones(n_q, dtype=torch.bool, device=DEVICE))
    torch.testing.assert_close(o[..., seen, :], expected[..., seen, :])
    assert torch.all(o[..., ~seen, :] == 0) and torch.all(lse[..., ~seen] == float("-inf"))
    scores = q @ k.transpose(-1, -2) / 24**0.5
    if causal:
        scores = scores.masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(lse[..., seen], torch.logsumexp(scores, -1)[..., seen])


@pytest.mark.parametrize("causal", [False, True])
def test_naive_grouped_heads_and_padding_match_torch_math(causal):
    q, k, v = (t.double() for t in qkv(9, 12, head_dim=24, heads=6))
    k, v = k[:, :2], v[:, :2]
    padding = torch.rand(2, 12, device=DEVICE) > 0.3
    padding[:, -1] = True  # every row keeps its last key (causal bottom-right sees it)
    allowed = padding[:, None, None, :] & (~causal_mask(9, 12, DEVICE) if causal else True)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)
    torch.testing.assert_close(attention.naive_attention(q, k, v, causal=causal, key_padding_mask=padding), expected)


def test_naive_varlen_is_one_call_per_sequence():
    q, k, v, cu_q, cu_k, _, _ = varlen_args(lengths=(3, 0, 5))
    o, lse = naive_attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, causal=True, return_lse=True)
    for start, end in ((0, 3), (3, 8)):
        view = lambda t: t[start:end].double().transpose(0, 1)[None]
        o_b, lse_b = attention.naive_attention(view(q), view(k), view(v), causal=True, return_lse=True)
        torch.testing.assert_close(o[start:end], o_b[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, start:end], lse_b[0])


def test_naive_upcast_returns_float32():
    q, k, v = qkv(dtype=torch.bfloat16)
    assert attention.naive_attention(q, k, v, upcast=True).dtype == torch.float32
    assert attention.naive_attention(q, k, v).dtype == torch.bfloat16


def test_causal_mask_is_bottom_right():
    hidden = torch.tensor([[False, False, True], [False, False, False]])  # Nq=2, Nk=3: row 0 sees keys 0..1
    assert torch.equal(causal_mask(2, 3), hidden)


# ---- op registration: schema, fake (meta) implementation, autograd


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("case", ["plain", "gqa-padding", "varlen", "modifiers"])
def test_opcheck(backend, case):
    forward = {"triton": torch.ops.fused_attention_triton.fwd,
               EMULATED_CUDA: getattr(torch.ops.fused_attention_emulated, "fwd", None)}.get(
        backend, torch.ops.fused_attention.fwd)
    dtype = torch.float16 if DEVICE == "cuda" or backend == EMULATED_CUDA else torch.float32
    q, k, v = qkv(n_q=17, n_k=19, head_dim=32, dtype=dtype, batch=2, heads=4)
    no_modifiers = (-1, -1, 0.0, None, 0.0, 0, 0)  # window_left .. dropout_offset
    args = (q, k, v, True, 0.25, None, None, None, 0, 0, -1, 0, 0.0, None, 0.0, 0, 0)
    if case == "gqa-padding":
        args = (q, k[:, :2], v[:, :2], True, 0.25, torch.rand(2, 19, device=DEVICE) > 0.3, None, None, 0, 0,
                *no_modifiers)
    elif case == "modifiers":
        slopes = torch.rand(2, 4, device=DEVICE)
        args = (q, k[:, :2], v[:, :2], False, 0.25, None, None, None, 0, 0, 5, 3, 4.0, slopes, 0.2, 77, 3)
    elif case == "varlen":
        packed = lambda total, heads: torch.randn(total, heads, 32, device=DEVICE, dtype=dtype).transpose(0, 1)[None]
        cu_q = torch.tensor([0, 5, 5, 34], dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor([0, 9, 20, 38], dtype=torch.int32, device=DEVICE)
        args = (packed(34, 4), packed(38, 2), packed(38, 2), True, 0.25, None, cu_q, cu_k, 29, 18, -1, 0, 0.0, None,
                0.0, 0, 0)
    args = tuple(t.requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in args)
    torch.library.opcheck(forward, args)


def test_sdpa_fallback_when_torch_sdpa_is_replaced_by_ours(monkeypatch):
    """Patching F.scaled_dot_product_attention with ours (as a model integration does) must not recurse."""
    q, k, v = qkv()
    mask = torch.rand(8, 8, device=DEVICE) > 0.3  # not a key-padding mask: torch's SDPA runs it
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    monkeypatch.setattr(F, "scaled_dot_product_attention", attention.scaled_dot_product_attention)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected)


@pytest.mark.parametrize("causal", [False, True])
def test_sdpa_4d_masks_equal_to_key_padding_run_on_our_kernels(causal):
    """Hugging Face's (B, 1, Nq, Nk) masks of padded batches: padding alone, or with the causal triangle
    (bottom-right, as with a KV cache: 5 new queries after 6 cached keys)."""
    q, k, v = qkv(n_q=5, n_k=11, heads=4)
    padding = torch.arange(11, device=DEVICE) >= torch.tensor([[0], [3]], device=DEVICE)  # left padding
    mask = padding[:, None, None, :].expand(2, 1, 5, 11)
    if causal:
        mask = mask & ~causal_mask(5, 11, DEVICE)
    explanation = attention.explain_sdpa(q, k, v, attn_mask=mask)
    assert explanation.backend is not None, explanation
    expected = attention.flash_attention(q, k, v, causal=causal, key_padding_mask=padding, backend="naive")
    torch.testing.assert_close(attention.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected)
    torch.testing.assert_close(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), expected)
    other = mask.clone()
    other[0, 0, 0, 0] = ~other[0, 0, 0, 0]  # no longer padding (+ causal): torch's SDPA runs it
    assert attention.explain_sdpa(q, k, v, attn_mask=other).backend is None


# ---- score modifiers: validation, the dropout generator, the reference's semantics

BAD_MODIFIERS = [
    (dict(window=(-2, 0)), ValueError, r"window\[0\] \(left\) must be >= -1, got -2"),
    (dict(window=(3, -5)), ValueError, r"window\[1\] \(right\) must be >= -1, got -5"),
    (dict(window=4), TypeError, r"window must be a pair \(left, right\)"),
    (dict(window=(1.5, 0)), TypeError, r"window\[0\] \(left\) must be an int"),
    (dict(softcap=-1.0), ValueError, r"softcap must be finite and >= 0"),
    (dict(softcap=float("inf")), ValueError, r"softcap must be finite and >= 0"),
    (dict(softcap="5"), TypeError, r"softcap must be a float"),
    (dict(alibi_slopes=torch.ones(2)), ValueError, r"alibi_slopes must have shape \(heads,\) = \(3,\) or"),
    (dict(alibi_slopes=torch.ones(3, 2)), ValueError, r"alibi_slopes must have shape"),
    (dict(alibi_slopes=torch.ones(3, dtype=torch.float64)), TypeError, r"alibi_slopes must be float32"),
    (dict(alibi_slopes=[0.5, 0.25, 0.125]), TypeError, r"alibi_slopes must be a torch.Tensor"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(dropout_p=0.1, dropout_seed=-3), ValueError, r"dropout_seed must be in \[0, "),
    (dict(dropout_p=0.1, dropout_seed=2.0), TypeError, r"dropout_seed must be an int"),
]


@pytest.mark.parametrize("options,error,message", BAD_MODIFIERS)
def test_bad_modifiers_raise_naming_the_argument(options, error, message):
    q, k, v = qkv()
    for call in (attention.flash_attention, attention.explain):
        with pytest.raises(error, match=message):
            call(q, k, v, **options)


def test_bad_modifiers_in_the_cpp_op_raise_naming_the_argument():
    """The C++ ops' own checks, for direct op calls that skip the Python layer."""
    if attention.ops.EXTENSION_ERROR is not None:
        pytest.skip(attention.ops.EXTENSION_ERROR)
    q, k, v = (t.cpu() for t in qkv())
    args = lambda window_left=-1, softcap=0.0, slopes=None, dropout_p=0.0: (
        q, k, v, False, 0.25, None, None, None, 0, 0, window_left, -1, softcap, slopes, dropout_p, 0, 0)
    for bad, message in ((dict(window_left=-2), "window_left and window_right must be >= -1"),
                         (dict(softcap=-1.0), "softcap must be finite and >= 0"),
                         (dict(slopes=torch.ones(3)), r"alibi_slopes must have shape \(batch, heads\)"),
                         (dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)")):
        with pytest.raises(RuntimeError, match=message):
            torch.ops.fused_attention.fwd(*args(**bad))


def test_causal_is_a_window_ending_at_the_diagonal():
    options = attention.validation.AttentionOptions(causal=True, softmax_scale=1.0, window_left=4, window_right=7)
    assert options.window == (4, 0) and options.causal
    assert attention.validation.AttentionOptions(causal=False, softmax_scale=1.0, window_right=0).causal
    q, k, v = qkv(n_q=6, n_k=9)
    torch.testing.assert_close(attention.flash_attention(q, k, v, window=(-1, 0), backend="naive"),
                               attention.flash_attention(q, k, v, causal=True, backend="naive"))


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    from attention.dropout import philox4x32

    vectors = [((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
               ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
               ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
                (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))]
    for counter, key, expected in vectors:
        assert tuple(int(w) for w in philox4x32(counter, key)) == expected


def test_dropout_mask_keep_rate_and_seeds():
    """Keep-rate within 5 sigma of the binomial's; seeds and offsets give other masks; a sub-shape's mask
    is the corner of a larger one (a pure function of b, h, i, j: varlen sequences rely on it)."""
    p, shape = 0.3, (2, 3, 64, 67)
    mask = attention.dropout_mask(p, 42, 0, *shape)
    n = mask.numel()
    assert abs(mask.sum().item() - n * (1 - p)) < 5 * (n * p * (1 - p)) ** 0.5
    assert not torch.equal(mask, attention.dropout_mask(p, 43, 0, *shape))
    assert not torch.equal(mask, attention.dropout_mask(p, 42, 1, *shape))
    assert (mask != attention.dropout_mask(p, 43, 0, *shape)).float().mean() > 0.3  # independent, not shifted
    assert torch.equal(attention.dropout_mask(p, 42, 0, 2, 3, 10, 13), mask[:, :, :10, :13])
    assert attention.dropout_mask(0.0, 42, 0, *shape).all()


def test_naive_modifiers_match_their_definition():
    """The reference against the contract written out elementwise (shift = Nk - Nq, query i, key j)."""
    q, k, v = (t.double() for t in qkv(n_q=5, n_k=9, batch=2, heads=2))
    slopes = torch.tensor([[0.5, 0.25], [1.0, 0.125]])
    window, softcap, p = (2, 1), 2.0, 0.4
    mask = attention.dropout_mask(p, 3, 0, 2, 2, 5, 9)
    o = attention.naive_attention(q, k, v, window=window, softcap=softcap, alibi_slopes=slopes, dropout_p=p,
                                  dropout_mask=mask)
    expected = torch.zeros_like(o)
    for b in range(2):
        for h in range(2):
            for i in range(5):
                distance = [i + 4 - j for j in range(9)]
                visible = [j for j in range(9) if -window[1] <= distance[j] <= window[0]]
                scores = torch.stack([softcap * torch.tanh((q[b, h, i] @ k[b, h, j]) * 0.25 / softcap)
                                      - slopes[b, h] * abs(distance[j]) for j in visible])
                probs = torch.softmax(scores, 0)
                for prob, j in zip(probs, visible):
                    expected[b, h, i] += prob * mask[b, h, i, j] / (1 - p) * v[b, h, j]
    torch.testing.assert_close(o, expected)


def test_naive_dropout_needs_its_mask():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"give both or neither"):
        attention.naive_attention(q, k, v, dropout_p=0.1)


def test_sdpa_dropout_runs_on_our_kernels():
    """dropout_p > 0 takes our kernels, with a mask drawn from torch's generator (torch.manual_seed repeats it)."""
    q, k, v = qkv(n_q=16, n_k=16)
    assert attention.explain_sdpa(q, k, v, dropout_p=0.3).backend is not None
    torch.manual_seed(5)
    first = attention.scaled_dot_product_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    assert torch.equal(first, attention.scaled_dot_product_attention(q, k, v, dropout_p=0.3))
    no_dropout = attention.scaled_dot_product_attention(q, k, v)
    assert not torch.allclose(first, no_dropout)
    # the same probabilities, rescaled: on average the output keeps its size
    assert 0.5 < first.abs().mean() / no_dropout.abs().mean() < 2.0


def test_attention_dropout_only_in_training():
    layer = MultiHeadAttention(32, 4, dropout=0.5, backend="naive").to(DEVICE)
    x = torch.randn(2, 9, 32, device=DEVICE)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    first = layer(x)
    assert not torch.allclose(first, layer(x))
