"""How much arithmetic one attention call does, so every provider is scored on the same work."""

MODES = ("fwd", "bwd", "fwd+bwd")

# The backward recomputes the scores and does four matmuls to the forward's two: 2.5x the forward,
# as the FlashAttention papers count it; fwd+bwd is both.
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}


def attention_flops(batch, heads, n_q, n_k, head_dim, causal, mode):
    """Floating-point operations of attention: two (Nq x Nk x D) matmuls, 2 flops per multiply-add.

    A causal mask skips about half the score matrix, so it counts half (exact for Nq == Nk in the limit).
    """
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    forward = 4.0 * batch * heads * n_q * n_k * head_dim
    if causal:
        forward /= 2
    return forward * MODE_FACTOR[mode]


def tflops_per_second(flops, ms):
    """TFLOP/s of a call doing ``flops`` in ``ms`` milliseconds (nan when there is no time)."""
    if not ms or ms != ms:
        return float("nan")
    return flops / (ms * 1e-3) / 1e12
