"""The instruction sets of the C++ CPU kernels' tile products (csrc/cpu/isa.h), each forced in turn.

The kernels use the best the CPU has (bf16 tiles on AVX512_BF16 multiply as bf16 pairs; everything else
as floats on AVX-512, AVX2 or baseline x86-64). torch.ops.fused_attention.cpu_isa(name) and the variable
FUSED_ATTENTION_CPU_ISA force a lower one, so that on the best machine every path runs here. A level the
CPU lacks cannot run: its tests skip, naming it.
"""
import os
import subprocess
import sys

import pytest
import torch

from test_cpu_backend import assert_close_to_reference, bwd, fwd, random_inputs

pytest.importorskip("attention._C", reason="the C++ extension attention._C is not built")

ISAS = ["baseline", "avx2", "avx512", "avx512_bf16"]
INITIAL = torch.ops.fused_attention.cpu_isa()


@pytest.fixture(params=ISAS)
def isa(request):
    """Forces request.param for one test, and restores the initial level after it."""
    try:
        torch.ops.fused_attention.cpu_isa(request.param)
    except RuntimeError as error:
        assert "this CPU has no" in str(error)
        pytest.skip(f"this CPU has no {request.param}")
    yield request.param
    torch.ops.fused_attention.cpu_isa(INITIAL)


SHAPES = [(1, 1, 1, 1, 16), (1, 2, 5, 9, 1), (2, 3, 17, 33, 17), (1, 2, 113, 70, 72), (1, 1, 130, 130, 128)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_each_isa_matches_reference(isa, dtype, causal, shape):
    q, k, v, dout = random_inputs(shape, dtype)
    scale = shape[-1] ** -0.5
    o, lse = fwd(q, k, v, causal, scale)
    grads = bwd(dout, q, k, v, o, lse, causal, scale)
    assert torch.ops.fused_attention.cpu_isa() == isa
    assert_close_to_reference(q, k, v, dout, causal, scale, o, lse, grads)


def test_bf16_pairs_agree_with_float_tiles():
    """bf16 products (AVX512_BF16) and float products differ only by the rounding of P and dS to bf16."""
    try:
        torch.ops.fused_attention.cpu_isa("avx512_bf16")
    except RuntimeError:
        pytest.skip("this CPU has no avx512_bf16")
    try:
        q, k, v, dout = random_inputs((1, 2, 200, 150, 64), torch.bfloat16)
        results = {}
        for isa in ("avx512_bf16", "avx512"):
            torch.ops.fused_attention.cpu_isa(isa)
            o, lse = fwd(q, k, v, True, 0.125)
            results[isa] = (o, lse, *bwd(dout, q, k, v, o, lse, True, 0.125))
    finally:
        torch.ops.fused_attention.cpu_isa(INITIAL)
    (o, lse, *grads), (o_f, lse_f, *grads_f) = results["avx512_bf16"], results["avx512"]
    # lse: exact bf16 products summed in float either way
    torch.testing.assert_close(lse, lse_f, rtol=0, atol=1e-5)
    for ours, floats in zip((o, *grads), (o_f, *grads_f)):
        torch.testing.assert_close(ours.float(), floats.float(), rtol=0.02, atol=0.02)


def test_unknown_isa_is_refused():
    with pytest.raises(RuntimeError, match="unknown instruction set 'avx9'"):
        torch.ops.fused_attention.cpu_isa("avx9")
    assert torch.ops.fused_attention.cpu_isa() == INITIAL


def _run(code, isa):
    env = {**os.environ, "FUSED_ATTENTION_CPU_ISA": isa}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)


def test_environment_variable_sets_the_isa():
    result = _run("import attention, torch; print(torch.ops.fused_attention.cpu_isa())", "baseline")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "baseline"


def test_environment_variable_names_a_bad_value():
    code = "import attention, torch; q = torch.randn(1, 1, 4, 8); attention.flash_attention(q, q, q, backend='cpu')"
    result = _run(code, "avx9")
    assert result.returncode != 0
    assert "FUSED_ATTENTION_CPU_ISA: unknown instruction set 'avx9'" in result.stderr
