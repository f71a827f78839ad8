"""torch's scaled_dot_product_attention routed to ours (patch_torch_sdpa), and what the drop-in must do as
torch does: CausalBias, errors of the same type, autocast, nested tensors, no silent double backward."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right, causal_upper_left

import attention
from grid import DEVICE

TORCH_SDPA = F.scaled_dot_product_attention


def qkv(n_q=8, n_k=8, head_dim=16, dtype=torch.float32, batch=2, heads=4, kv_heads=None, requires_grad=False):
    make = lambda h, n: torch.randn(batch, h, n, head_dim, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    return make(heads, n_q), make(kv_heads or heads, n_k), make(kv_heads or heads, n_k)


def torch_math(*args, **kwargs):
    with sdpa_kernel(SDPBackend.MATH):
        return TORCH_SDPA(*args, **kwargs)


def test_patch_routes_and_restores():
    q, k, v = qkv()
    with attention.patch_torch_sdpa() as stats:
        assert F.scaled_dot_product_attention is not TORCH_SDPA
        F.scaled_dot_product_attention(q, k, v, is_causal=True)
        F.scaled_dot_product_attention(q, k, v, attn_mask=torch.rand(8, 8, device=DEVICE) > 0.5)  # not padding
    assert F.scaled_dot_product_attention is TORCH_SDPA
    assert sum(stats.calls.values()) == 2 and stats.calls["torch"] == 1 and stats.ours == 0.5
    (reason,) = stats.fallbacks
    assert "not a boolean key-padding mask" in reason and "(...)" in reason


def test_patch_nests_restores_after_errors_and_decorates():
    q, k, v = qkv()
    with pytest.raises(ZeroDivisionError):
        with attention.patch_torch_sdpa():
            with attention.patch_torch_sdpa() as inner:
                F.scaled_dot_product_attention(q, k, v)
                1 / 0
    assert F.scaled_dot_product_attention is TORCH_SDPA and inner.calls.total() == 1
    patch = attention.patch_torch_sdpa()

    @patch
    def layer(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    torch.testing.assert_close(layer(q, k, v), TORCH_SDPA(q, k, v, is_causal=True))
    assert patch.stats.calls.total() == 1 and F.scaled_dot_product_attention is TORCH_SDPA


@pytest.mark.parametrize("n_q,n_k", [(8, 8), (5, 11), (11, 5)], ids=["square", "nq<nk", "nq>nk"])
@pytest.mark.parametrize("bias", [causal_upper_left, causal_lower_right], ids=["upper-left", "lower-right"])
def test_causal_bias(bias, n_q, n_k):
    """torch's CausalBias only intercepts torch's own function: patched, ours must take it apart."""
    q, k, v = qkv(n_q, n_k)
    # lower-right with Nq > Nk leaves rows without a key: 0 for us, 0 or NaN for torch (it warns)
    expected = TORCH_SDPA(q, k, v, attn_mask=bias(n_q, n_k)).nan_to_num(0.0)
    with attention.patch_torch_sdpa() as stats:
        ours = F.scaled_dot_product_attention(q, k, v, attn_mask=bias(n_q, n_k))
    torch.testing.assert_close(ours, expected)
    on_ours = bias is causal_lower_right or n_q == n_k  # upper-left with Nq != Nk is torch's is_causal
    assert stats.calls["torch"] == (0 if on_ours else 1)


def test_causal_bias_under_torch_compile():
    q, k, v = qkv(5, 11)

    def layer(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 11))

    expected = layer(q, k, v)
    with attention.patch_torch_sdpa():
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend="aot_eager" if DEVICE == "cpu" else "inductor")
        torch.testing.assert_close(compiled(q, k, v), expected)


def test_causal_bias_with_is_causal_raises_as_torch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        TORCH_SDPA(q, k, v, attn_mask=causal_lower_right(8, 8), is_causal=True)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        attention.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(8, 8), is_causal=True)


BAD_CALLS = [
    dict(attn_mask="int"),
    dict(attn_mask="wrong-shape"),
    dict(dropout_p=1.5),
    dict(is_causal=1),
    dict(scale="0.1"),
    dict(value_dtype=torch.float16),
]


@pytest.mark.parametrize("call", BAD_CALLS, ids=["int-mask", "mask-shape", "dropout", "is-causal-int", "scale-str",
                                                 "dtype-mismatch"])
def test_bad_calls_raise_what_torch_raises(call):
    q, k, v = qkv()
    call = dict(call)
    masks = {"int": torch.ones(8, 8, dtype=torch.int32, device=DEVICE),
             "wrong-shape": torch.ones(3, 8, 5, device=DEVICE)}
    if call.get("attn_mask") in masks:
        call["attn_mask"] = masks[call["attn_mask"]]
    v = v.to(call.pop("value_dtype", v.dtype))
    with pytest.raises(Exception) as torch_error:
        TORCH_SDPA(q, k, v, **call)
    with attention.patch_torch_sdpa():
        with pytest.raises(type(torch_error.value)):
            F.scaled_dot_product_attention(q, k, v, **call)


@pytest.mark.parametrize("case", ["plain", "causal", "gqa", "padding-mask", "float-mask", "scale"])
def test_patched_matches_torch_math(case):
    """Fused (ours, or torch's fallback) against torch's math backend in float32, patched."""
    kv_heads = 2 if case == "gqa" else None
    q, k, v = qkv(13, 13 if case == "causal" else 21, head_dim=24, kv_heads=kv_heads)
    kwargs = {"plain": {}, "causal": dict(is_causal=True), "gqa": dict(enable_gqa=True),
              "padding-mask": dict(attn_mask=torch.arange(21, device=DEVICE) < torch.tensor(
                  [[21], [9]], device=DEVICE)[:, None, None, :].expand(2, 1, 1, 21)),
              "float-mask": dict(attn_mask=torch.randn(13, 21, device=DEVICE)),
              "scale": dict(scale=0.3)}[case]
    expected = torch_math(q, k, v, **kwargs)
    with attention.patch_torch_sdpa() as stats:
        ours = F.scaled_dot_product_attention(q, k, v, **kwargs)
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=2e-5)
    assert stats.calls["torch"] == (1 if case == "float-mask" else 0)


@pytest.mark.skipif(DEVICE != "cpu", reason="CPU autocast")
def test_autocast_casts_like_torch():
    q, k, v = qkv()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = TORCH_SDPA(q, k, v)
        ours = attention.scaled_dot_product_attention(q, k, v)
        flash = attention.flash_attention(q, k, v)
    assert expected.dtype == ours.dtype == flash.dtype == torch.bfloat16
    torch.testing.assert_close(ours, expected, atol=2e-2, rtol=2e-2)


def test_nested_tensors_fall_back_or_are_refused():
    nested = torch.nested.nested_tensor([torch.randn(5, 3, 16), torch.randn(7, 3, 16)], layout=torch.jagged,
                                        device=DEVICE).transpose(1, 2)  # (B, H, ragged N, D)
    explanation = attention.explain_sdpa(nested, nested, nested)
    assert explanation.backend is None and "nested" in explanation.torch_fallback[0]
    torch.testing.assert_close(attention.scaled_dot_product_attention(nested, nested, nested).values(),
                               TORCH_SDPA(nested, nested, nested).values())
    with pytest.raises(TypeError, match="q is a nested tensor"):
        attention.flash_attention(nested, nested, nested)


def test_double_backward_is_an_error_not_a_wrong_gradient():
    q, k, v = qkv(requires_grad=True)
    o = attention.flash_attention(q, k, v)
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="no double backward"):
        dq.sum().backward()
    o = attention.flash_attention(q, k, v, backend="naive")
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    dq.sum().backward()  # the plain math has one


@pytest.mark.parametrize("bias", [causal_upper_left, causal_lower_right], ids=["upper-left", "lower-right"])
def test_causal_bias_through_torch_function_held_before_the_patch(bias):
    """`from torch.nn.functional import scaled_dot_product_attention` taken before patching (torch's own
    test suite does so): CausalBias must still be taken apart, not read as a raw tensor."""
    q, k, v = qkv(5, 11)
    expected = TORCH_SDPA(q, k, v, attn_mask=bias(5, 11))
    with attention.patch_torch_sdpa() as stats:
        held = TORCH_SDPA(q, k, v, attn_mask=bias(5, 11))
    torch.testing.assert_close(held, expected)
    assert stats.calls.total() == 1


def test_torch_compile_under_the_patch_leaves_torch_causal_bias_working():
    """torch.overrides caches which functions are overridable by their names' values: filled while patched,
    compiled calls of torch's own SDPA would stop dispatching CausalBias for the rest of the process."""
    q, k, v = qkv(5, 11)
    with attention.patch_torch_sdpa():
        torch._dynamo.reset()
        torch.compile(lambda q: F.scaled_dot_product_attention(q, k, v), backend="aot_eager")(q)

    def torch_layer(q, k, v):
        return TORCH_SDPA(q, k, v, attn_mask=causal_lower_right(5, 11))

    torch._dynamo.reset()
    compiled = torch.compile(torch_layer, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), torch_layer(q, k, v))
