"""The public contract: validation, backend choice, SDPA drop-in semantics, the naive reference, op registration."""
import re

import pytest
import torch
import torch.nn.functional as F

import attention
from attention.reference import causal_mask
from grid import DEVICE, backends_under_test


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
    (lambda q, k, v: (q, k, v[:1]), ValueError, r"v has \(batch, heads\) \(1, 3\) but q has \(2, 3\)"),
    (lambda q, k, v: (q, k[:, :2], v), ValueError, r"k has \(batch, heads\)"),
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
    (dict(attn_mask="mask"), "attn_mask is given"),
    (dict(dropout_p=0.5), "dropout_p=0.5"),
    (dict(is_causal=True, n_q=5, n_k=9), "top-left"),
    (dict(enable_gqa=True, kv_heads=1), "k has \\(batch, heads\\)"),
    (dict(dtype=torch.float64), "q must be float16, bfloat16 or float32"),
]


@pytest.mark.parametrize("case,reason", SDPA_FALLBACKS, ids=["mask", "dropout", "causal-nq-ne-nk", "gqa", "float64"])
def test_sdpa_falls_back_to_torch_and_says_so(case, reason):
    case = dict(case)
    n_q, n_k, kv_heads = case.pop("n_q", 8), case.pop("n_k", 8), case.pop("kv_heads", 3)
    dtype = case.pop("dtype", torch.float32)
    q, k, v = qkv(n_q, n_k, dtype=dtype)
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    if case.get("attn_mask") == "mask":
        case["attn_mask"] = torch.rand(n_q, n_k, device=DEVICE) > 0.3
    explanation = attention.explain_sdpa(q, k, v, **case)
    assert explanation.backend is None and any(re.search(reason, r) for r in explanation.torch_fallback), explanation
    torch.manual_seed(0)
    ours = attention.scaled_dot_product_attention(q, k, v, **case)
    torch.manual_seed(0)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, **case))


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


def test_naive_upcast_returns_float32():
    q, k, v = qkv(dtype=torch.bfloat16)
    assert attention.naive_attention(q, k, v, upcast=True).dtype == torch.float32
    assert attention.naive_attention(q, k, v).dtype == torch.bfloat16


def test_causal_mask_is_bottom_right():
    hidden = torch.tensor([[False, False, True], [False, False, False]])  # Nq=2, Nk=3: row 0 sees keys 0..1
    assert torch.equal(causal_mask(2, 3), hidden)


# ---- op registration: schema, fake (meta) implementation, autograd


@pytest.mark.parametrize("backend", backends_under_test())
def test_opcheck(backend):
    forward = torch.ops.fused_attention_triton.fwd if backend == "triton" else torch.ops.fused_attention.fwd
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q, k, v = (t.requires_grad_() for t in qkv(n_q=17, n_k=19, head_dim=32, dtype=dtype, batch=1, heads=2))
    torch.library.opcheck(forward, (q, k, v, True, 0.25))
