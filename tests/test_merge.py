"""attention.merge: attention over a partition of the keys, merged by lse, equals attention over all;
and each backend's backward of one part, given the merged result, is that part's share of the gradient."""
import pytest
import torch

import attention
from attention.backends import select_backend
from attention.merge import merge_partials, merge_two
from attention.reference import naive_attention
from attention.validation import AttentionOptions
from grid import _backend, assert_within_rule, backends_under_test


def _parts(q, k, v, bounds, **options):
    outs = [naive_attention(q, k[:, :, a:b], v[:, :, a:b], return_lse=True, **options) for a, b in bounds]
    return torch.stack([o for o, _ in outs]), torch.stack([lse for _, lse in outs])


@pytest.mark.parametrize("bounds", [[(0, 7)], [(0, 3), (3, 7)], [(0, 1), (1, 2), (2, 5), (5, 7)]])
def test_merge_of_key_chunks_is_attention_over_all_keys(bounds):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, n, 8, generator=gen, dtype=torch.float64) for n in (5, 7, 7))
    o_parts, lse_parts = _parts(q, k, v, bounds)
    o, lse = merge_partials(o_parts, lse_parts)
    ref_o, ref_lse = naive_attention(q.float(), k.float(), v.float(), return_lse=True)
    torch.testing.assert_close(o, ref_o, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, ref_lse, atol=1e-6, rtol=1e-6)
    assert o.dtype == lse.dtype == torch.float32


def test_parts_without_keys_weigh_nothing_and_rows_without_any_are_zero():
    gen = torch.Generator().manual_seed(1)
    o_parts = torch.randn(3, 1, 1, 4, 8, generator=gen)
    lse_parts = torch.randn(3, 1, 1, 4, generator=gen)
    lse_parts[1] = float("-inf")  # part 1 saw no key in any row
    o_parts[1] = 0
    lse_parts[:, :, :, 2] = float("-inf")  # row 2 saw no key in any part
    o_parts[:, :, :, 2] = 0
    o, lse = merge_partials(o_parts, lse_parts)
    expected_o, expected_lse = merge_partials(o_parts[[0, 2]], lse_parts[[0, 2]])
    assert not o.isnan().any()
    torch.testing.assert_close(o, expected_o)
    assert lse[0, 0, 2].item() == float("-inf") and o[0, 0, 2].abs().max().item() == 0
    torch.testing.assert_close(lse[lse.isfinite()], expected_lse[expected_lse.isfinite()])


def test_merge_two_is_differentiable():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, n, 4, generator=gen, dtype=torch.float64, requires_grad=True) for n in (3, 6, 6))
    (o_a, lse_a), (o_b, lse_b) = (naive_attention(q, k[:, :, s], v[:, :, s], return_lse=True)
                                  for s in (slice(0, 2), slice(2, 6)))
    o, _ = merge_two(o_a, lse_a, o_b, lse_b)
    o.sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    naive_attention(q, k, v).sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, atol=1e-5, rtol=1e-5)


def test_mismatched_shapes_name_the_arguments():
    with pytest.raises(ValueError, match="o_parts .* lse_parts"):
        merge_partials(torch.zeros(2, 3, 4), torch.zeros(2, 4))


@pytest.mark.parametrize("backend", ["naive", *backends_under_test()])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_of_key_blocks_given_the_merged_output(backend, causal):
    """Backend.backward on each block of keys, handed the merged (o, lse) of all of them, gives that
    block's share of the gradients: the step of a ring backward. Blocks: keys [0, 3) that every query
    sees in full, then the last 9 keys, bottom-right causal against the 9 queries."""
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float32 if backend in ("naive", "cpu") else torch.bfloat16
    q, dout = (torch.randn(1, 4, 9, 16, generator=gen).to(dtype) for _ in range(2))
    k, v = (torch.randn(1, 2, 12, 16, generator=gen).to(dtype) for _ in range(2))
    whole = AttentionOptions(causal=causal, softmax_scale=0.3)
    blocks = [(slice(0, 3), AttentionOptions(causal=False, softmax_scale=0.3)), (slice(3, 12), whole)]
    chosen = select_backend(q, k, v, whole, _backend(backend))
    with torch.no_grad():
        parts = [chosen.forward(q, k[:, :, keys], v[:, :, keys], options) for keys, options in blocks]
        o, lse = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
        o = o.to(dtype)
        grads = [chosen.backward(dout, q, k[:, :, keys], v[:, :, keys], o, lse, options) for keys, options in blocks]
    dq = sum(g[0].float() for g in grads)
    dk, dv = (torch.cat([g[i] for g in grads], dim=2) for i in (1, 2))
    reference = lambda q, k, v: attention.naive_attention(q, k, v, causal=causal, softmax_scale=0.3)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(reference(*leaves), leaves, dout.double())
    lowprec = [t.detach().requires_grad_() for t in (q, k, v)]
    low_grads = torch.autograd.grad(reference(*lowprec), lowprec, dout)
    for name, got, ref, low in zip(("dq", "dk", "dv"), (dq, dk, dv), ref_grads, low_grads):
        assert_within_rule(name, got, ref, low, 3)
