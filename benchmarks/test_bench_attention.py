"""Regression benchmarks of every provider, for pytest-benchmark.

    pytest benchmarks --benchmark-save=NAME          # record a run (on a GPU: shapes worth tracking)
    pytest benchmarks --benchmark-compare            # compare with the last saved run
    pytest benchmarks --benchmark-disable            # CI: each case once, at tiny CPU sizes, as a test

Each case first checks its provider's output (and gradients) against the float64 reference with the
project's tolerance rule, so a benchmark of a wrong answer fails instead of being recorded.
"""
import dataclasses

import pytest
import torch

import attention
from benchmarks.flops import MODES, tflops_per_second
from benchmarks.providers import all_providers, needs_grad
from benchmarks.cases import DTYPES, Config, make_inputs
from benchmarks.timing import synchronize

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

if DEVICE.type == "cuda":  # 16K tokens, hidden 2048, as in the main job
    CONFIGS = [
        Config(4, 16, 4096, 128, False, "bf16"),
        Config(4, 16, 4096, 128, True, "bf16"),
        Config(16, 32, 1024, 64, True, "fp16"),
    ]
else:  # tiny, odd head dim: the cases stay cheap enough for every CI run
    CONFIGS = [Config(2, 2, 64, 24, False, "fp32"), Config(2, 2, 64, 24, True, "fp32")]


def _config_id(c):
    return f"B{c.batch}-H{c.heads}-N{c.seqlen}-d{c.head_dim}-{'causal' if c.causal else 'full'}-{c.dtype}"


def _max_error(actual, expected):
    return (actual.double() - expected.double()).abs().max().item()


def _output_and_grads(forward, q, k, v, causal, dout, dtype):
    """forward's output and, when q requires grad, the gradients of <output, dout>, computed in ``dtype``."""
    with_grads = q.requires_grad
    inputs = [t.detach().to(dtype).requires_grad_(with_grads) for t in (q, k, v)]
    out = forward(*inputs, causal)
    return out, (torch.autograd.grad(out, inputs, dout.to(dtype)) if with_grads else ())


def _naive(q, k, v, causal):
    return attention.naive_attention(q, k, v, causal=causal)


def check_against_reference(provider, q, k, v, causal):
    """Output within 2x, gradients within 3x, the error of naive attention in the input dtype (+1e-5)."""
    dout = torch.randn_like(q)
    out, grads = _output_and_grads(provider.forward, q, k, v, causal, dout, q.dtype)
    ref_out, ref_grads = _output_and_grads(_naive, q, k, v, causal, dout, torch.float64)
    low_out, low_grads = _output_and_grads(_naive, q, k, v, causal, dout, q.dtype)
    assert _max_error(out, ref_out) <= 2 * _max_error(low_out, ref_out) + 1e-5, f"{provider.name}: output"
    for name, grad, ref, low in zip(("dq", "dk", "dv"), grads, ref_grads, low_grads):
        assert _max_error(grad, ref) <= 3 * _max_error(low, ref) + 1e-5, f"{provider.name}: {name}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("provider", all_providers(), ids=lambda p: p.name)
def test_attention(benchmark, provider, config, mode):
    reason = provider.why_not(DEVICE, DTYPES[config.dtype], config.head_dim, config.causal, mode)
    if reason:
        pytest.skip(reason)
    # Checked on a short slice of the shape: the float64 reference of a long one would not fit in memory.
    check_config = dataclasses.replace(config, batch=1, seqlen=min(config.seqlen, 256))
    check_against_reference(provider, *make_inputs(check_config, DEVICE, needs_grad(mode)), config.causal)
    step = provider.step(mode, *make_inputs(config, DEVICE, needs_grad(mode)), config.causal)

    def synchronized_step():  # GPU work is asynchronous: time it to its end, not to its launch
        step()
        synchronize(DEVICE)

    synchronized_step()  # compilation and autotuning stay out of the statistics
    benchmark.group = f"{mode} {_config_id(config)}"
    benchmark.extra_info.update(provider=provider.name, mode=mode, flops=config.flops(mode), device=str(DEVICE))
    benchmark(synchronized_step)
    if benchmark.enabled:
        median_ms = benchmark.stats.stats.median * 1e3
        benchmark.extra_info["tflops"] = tflops_per_second(config.flops(mode), median_ms)
