"""The plain O(n²) attention: the baseline of every benchmark and the reference of every test."""
import math

import torch


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Bool (Nq, Nk), True where the key is hidden. Bottom-right aligned: query i sees j <= i + Nk - Nq."""
    rows = torch.arange(n_q, device=device)[:, None]
    cols = torch.arange(n_k, device=device)[None, :]
    return cols > rows + (n_k - n_q)


def naive_attention(q, k, v, causal=False, softmax_scale=None, upcast=False, return_lse=False):
    """softmax(scale · q kᵀ, masked) @ v, materializing the (Nq, Nk) score matrix.

    Computed in the input dtype, or in float32 with ``upcast=True`` (the result then stays float32:
    that is the reference the tests and benchmarks compare against). Rows with no visible key give
    output 0 and lse -inf, and their gradients are 0, not NaN.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    scores = (q @ k.transpose(-2, -1)) * scale
    if causal:
        hidden = causal_mask(q.shape[-2], k.shape[-2], q.device)
        # A row with every key hidden would softmax to NaN; give it harmless scores, then zero it.
        no_key = hidden.all(-1, keepdim=True)
        scores = scores.masked_fill(hidden & ~no_key, float("-inf")).masked_fill(no_key, 0.0)
        p = torch.softmax(scores, dim=-1).masked_fill(no_key, 0.0)
    else:
        p = torch.softmax(scores, dim=-1)
    o = p @ v
    if not return_lse:
        return o
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    if causal:
        lse = lse.masked_fill(no_key.squeeze(-1), float("-inf"))
    return o, lse
