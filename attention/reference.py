"""The plain O(n²) attention: the baseline of every benchmark and the reference of every test.

It implements every option in plain torch and is the specification the fused backends are tested
against: grouped-query heads (k and v expanded here, never in the kernels), key padding, packed
variable-length batches.
"""
import math

import torch


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Bool (Nq, Nk), True where the key is hidden. Bottom-right aligned: query i sees j <= i + Nk - Nq."""
    rows = torch.arange(n_q, device=device)[:, None]
    cols = torch.arange(n_k, device=device)[None, :]
    return cols > rows + (n_k - n_q)


def expand_kv_heads(t, q_heads):
    """(B, Hkv, N, D) -> (B, Hq, N, D): query head h reads KV head h // (Hq // Hkv), SDPA's enable_gqa."""
    return t.repeat_interleave(q_heads // t.shape[1], dim=1) if t.shape[1] != q_heads else t


def naive_attention(q, k, v, causal=False, softmax_scale=None, upcast=False, return_lse=False, *,
                    key_padding_mask=None):
    """softmax(scale · q kᵀ, masked) @ v, materializing the (Nq, Nk) score matrix.

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D) with Hq a multiple of Hkv (grouped-query heads).
    ``key_padding_mask``: bool (B, Nk), True where the key is real. Computed in the input dtype, or in
    float32 with ``upcast=True`` (the result then stays float32: that is the reference the tests and
    benchmarks compare against). Rows with no visible key give output 0 and lse -inf, and their
    gradients are 0, not NaN.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) * scale
    hidden = None  # broadcastable to (B, H, Nq, Nk), True where the key is hidden
    if causal:
        hidden = causal_mask(q.shape[-2], k.shape[-2], q.device)
    if key_padding_mask is not None:
        padding = ~key_padding_mask[:, None, None, :]
        hidden = padding if hidden is None else hidden | padding
    if hidden is not None:
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
    if hidden is not None:
        lse = lse.masked_fill(no_key.squeeze(-1), float("-inf"))
    return o, lse


def naive_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None, upcast=False,
                           return_lse=False):
    """``naive_attention`` on packed variable-length batches, flash-attn's layout: q (total_q, Hq, D),
    k and v (total_k, Hkv, D), sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]. Returns o
    (total_q, Hq, D) and, with ``return_lse``, lse float32 (Hq, total_q). One call per sequence."""
    dtype = torch.float32 if upcast else q.dtype
    o = q.new_zeros(q.shape, dtype=dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device,
                     dtype=torch.promote_types(dtype, torch.float32))
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        if q1 == q0 or k1 == k0:  # no query, or no key to see: o stays 0, lse -inf
            continue
        as_batch = lambda t, start, end: t[start:end].transpose(0, 1)[None]  # (1, H, n, D)
        o_b, lse_b = naive_attention(as_batch(q, q0, q1), as_batch(k, k0, k1), as_batch(v, k0, k1), causal,
                                     softmax_scale, upcast, return_lse=True)
        o = o.index_copy(0, torch.arange(q0, q1, device=q.device), o_b[0].transpose(0, 1))
        lse = lse.index_copy(1, torch.arange(q0, q1, device=q.device), lse_b[0])
    return (o, lse) if return_lse else o
