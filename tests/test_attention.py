"""Every fused backend, through the public API, against the float64 naive reference.

The default grid is small enough for CI's CPU (C++ kernels, Triton on its interpreter);
``pytest --full`` on a GPU runs the whole grid in fp16/bf16.
"""
import pytest
import torch

import attention
from grid import DEVICE, assert_within_rule, case_grid, flash_attention, poison_allocator


def pytest_generate_tests(metafunc):
    full = metafunc.config.getoption("--full")
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("backend,dtype,shape", case_grid(full))
    elif "backend" in metafunc.fixturenames:
        metafunc.parametrize("backend,dtype", case_grid(full, with_shapes=False))


def random_inputs(shape, dtype, seed=0):
    batch, heads, n_q, n_k, head_dim = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    make = lambda n: torch.randn(batch, heads, n, head_dim, generator=gen, device=DEVICE, dtype=dtype)
    return make(n_q), make(n_k), make(n_k), make(n_q)


def run(backend, q, k, v, dout, causal, softmax_scale=None):
    """Output, lse and gradients of one attention call on fresh leaves."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    if backend == "reference":
        o, lse = attention.naive_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    else:
        poison_allocator()
        o, lse = flash_attention(q, k, v, backend, causal=causal, softmax_scale=softmax_scale, return_lse=True)
    o.backward(dout)
    return o, lse, q.grad, k.grad, v.grad


def check_against_reference(backend, q, k, v, dout, causal, softmax_scale=None):
    ours = run(backend, q, k, v, dout, causal, softmax_scale)
    ref = run("reference", *(t.double() for t in (q, k, v, dout)), causal, softmax_scale)
    lowprec = run("reference", q, k, v, dout, causal, softmax_scale)
    lse, ref_lse, lowprec_lse = ours[1], ref[1], lowprec[1]
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    hidden = ref_lse.isinf()
    assert torch.equal(lse.isneginf(), hidden), "lse must be -inf exactly on rows that see no key"
    assert_within_rule("lse", lse[~hidden], ref_lse[~hidden], lowprec_lse[~hidden], 2)
    assert ours[0].dtype == q.dtype
    for name, factor, a, r, lp in zip(("o", "dq", "dk", "dv"), (2, 3, 3, 3), ours[:1] + ours[2:], ref[:1] + ref[2:],
                                      lowprec[:1] + lowprec[2:]):
        assert_within_rule(name, a, r, lp, factor)
    return ours


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
    inputs = random_inputs((2, 2, 67, 53, 64), dtype)
    first, second = run(backend, *inputs, causal), run(backend, *inputs, causal)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_softmax_scale(backend, dtype, causal):
    """A scale other than 1/sqrt(d), forward and backward."""
    check_against_reference(backend, *random_inputs((1, 2, 33, 45, 64), dtype), causal, softmax_scale=0.3)


def test_torch_compile_fullgraph(backend, dtype):
    """A function calling our op traces into one graph (no graph break) and gives the eager result."""
    q, k, v, dout = random_inputs((1, 2, 17, 17, 32), dtype)

    def layer(q, k, v):
        return flash_attention(q * 1.5, k, v, backend, causal=True).sum(dim=1)

    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager" if DEVICE == "cpu" else "inductor")
    torch.testing.assert_close(compiled(q, k, v), layer(q, k, v))
