"""How much arithmetic one attention call does, so every provider is scored on the same work."""
import numpy as np

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


def visible_pairs(n_q, n_k, window):
    """How many (query, key) pairs a window (left, right), -1 unbounded, lets through: query i sees
    keys max(0, i + shift - left) .. min(Nk - 1, i + shift + right), shift = Nk - Nq. Exact, in closed
    form per query (numpy over the queries: N up to the profiler's millions)."""
    left, right = window
    i = np.arange(n_q, dtype=np.int64) + (n_k - n_q)
    first = np.maximum(0, i - left) if left >= 0 else np.zeros_like(i)
    last = np.minimum(n_k - 1, i + right) if right >= 0 else np.full_like(i, n_k - 1)
    return int(np.maximum(0, last - first + 1).sum())


def windowed_attention_flops(batch, heads, n_q, n_k, head_dim, window, mode):
    """``attention_flops`` counting only the pairs the window lets through (``visible_pairs``), which is
    the work a kernel that skips hidden keys has to do: 4 * pairs * D per head forward."""
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    return 4.0 * batch * heads * visible_pairs(n_q, n_k, window) * head_dim * MODE_FACTOR[mode]


def tflops_per_second(flops, ms):
    """TFLOP/s of a call doing ``flops`` in ``ms`` milliseconds (nan when there is no time)."""
    if not ms or ms != ms:
        return float("nan")
    return flops / (ms * 1e-3) / 1e12
