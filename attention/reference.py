"""The plain O(n²) attention: the baseline of every benchmark and the reference of every test.

It implements every option in plain torch and is the specification the fused backends are tested
against: grouped-query heads (k and v expanded here, never in the kernels), key padding, packed
variable-length batches, sliding windows, softcap, ALiBi and dropout (given its mask).
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


def position_distance(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """Int (Nq, Nk): i + shift - j with shift = Nk - Nq, how far key j lies behind query i (bottom-right
    aligned, as every position-dependent option measures it)."""
    rows = torch.arange(n_q, device=device)[:, None]
    cols = torch.arange(n_k, device=device)[None, :]
    return rows + (n_k - n_q) - cols


def hidden_by_position(n_q, n_k, causal=False, window=(-1, -1), device=None):
    """Bool (Nq, Nk), True where causality or the window (left, right) hides key j from query i, or None."""
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)
    if left < 0 and right < 0:
        return None
    distance = position_distance(n_q, n_k, device)
    hidden = torch.zeros(n_q, n_k, dtype=torch.bool, device=device)
    if left >= 0:
        hidden |= distance > left
    if right >= 0:
        hidden |= distance < -right
    return hidden


def naive_attention(q, k, v, causal=False, softmax_scale=None, upcast=False, return_lse=False, *,
                    key_padding_mask=None, window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                    dropout_mask=None):
    """softmax(scale · q kᵀ, modified and masked) @ v, materializing the (Nq, Nk) score matrix.

    q (B, Hq, Nq, D); k, v (B, Hkv, Nk, D) with Hq a multiple of Hkv (grouped-query heads). With
    shift = Nk - Nq, query i and key j, the scores s = scale · q kᵀ are
    - soft-capped when ``softcap`` > 0: s = softcap · tanh(s / softcap);
    - biased by ALiBi when ``alibi_slopes`` (float32 (Hq,) or (B, Hq)) is given: s -= slope · |i + shift - j|;
    - hidden (-inf) where ``key_padding_mask`` (bool (B, Nk), True where the key is real) is False, where
      ``causal`` hides j > i + shift, and outside ``window`` = (left, right): i + shift - left <= j <=
      i + shift + right, -1 leaving that side unbounded.
    ``dropout_mask`` (bool, broadcastable to (B, Hq, Nq, Nk), True = kept; see ``attention.dropout_mask``)
    with ``dropout_p`` multiplies the probabilities by mask / (1 - dropout_p); lse is unaffected.
    Computed in the input dtype, or in float32 with ``upcast=True`` (the result then stays float32: that
    is the reference the tests and benchmarks compare against). Rows with no visible key give output 0
    and lse -inf, and their gradients are 0, not NaN.
    """
    if (dropout_mask is None) != (dropout_p == 0.0):
        raise ValueError("naive_attention applies dropout from dropout_mask (attention.dropout_mask makes one) "
                         "scaled by 1 / (1 - dropout_p): give both or neither")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    n_q, n_k = q.shape[-2], k.shape[-2]
    scores = (q @ k.transpose(-2, -1)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.reshape(-1, q.shape[1], 1, 1)  # (B or 1, Hq, 1, 1)
        distance = position_distance(n_q, n_k, q.device).abs()
        scores = scores - (slopes.double() * distance).to(scores.dtype)
    hidden = hidden_by_position(n_q, n_k, causal, window, q.device)  # broadcastable to (B, H, Nq, Nk)
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
    if dropout_mask is not None:
        p = p * dropout_mask / (1.0 - dropout_p)
    o = p @ v
    if not return_lse:
        return o
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    if hidden is not None:
        lse = lse.masked_fill(no_key.squeeze(-1), float("-inf"))
    return o, lse


def naive_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, softmax_scale=None, upcast=False,
                           return_lse=False, *, window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                           dropout_mask=None):
    """``naive_attention`` on packed variable-length batches, flash-attn's layout: q (total_q, Hq, D),
    k and v (total_k, Hkv, D), sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]. Returns o
    (total_q, Hq, D) and, with ``return_lse``, lse float32 (Hq, total_q). One call per sequence, with
    positions counted within it: ``alibi_slopes`` (Hq,) or (B, Hq) and ``dropout_mask`` (B, Hq, >= len_q,
    >= len_k) are indexed by sequence."""
    dtype = torch.float32 if upcast else q.dtype
    o = q.new_zeros(q.shape, dtype=dtype)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device,
                     dtype=torch.promote_types(dtype, torch.float32))
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b, ((q0, q1), (k0, k1)) in enumerate(zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:]))):
        if q1 == q0 or k1 == k0:  # no query, or no key to see: o stays 0, lse -inf
            continue
        as_batch = lambda t, start, end: t[start:end].transpose(0, 1)[None]  # (1, H, n, D)
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        mask = None if dropout_mask is None else dropout_mask[b:b + 1, :, :q1 - q0, :k1 - k0]
        o_b, lse_b = naive_attention(as_batch(q, q0, q1), as_batch(k, k0, k1), as_batch(v, k0, k1), causal,
                                     softmax_scale, upcast, return_lse=True, window=window, softcap=softcap,
                                     alibi_slopes=slopes, dropout_p=dropout_p, dropout_mask=mask)
        o = o.index_copy(0, torch.arange(q0, q1, device=q.device), o_b[0].transpose(0, 1))
        lse = lse.index_copy(1, torch.arange(q0, q1, device=q.device), lse_b[0])
    return (o, lse) if return_lse else o


def cache_keys(cache, block_table, b, length):
    """(1, Hkv, length, D): the first `length` rows of sequence b's cache, dense (B, Hkv, Ncache, D) or,
    with block_table (B, max_blocks), paged (num_blocks, Hkv, block_size, D): key j in row j % block_size
    of block block_table[b, j // block_size]."""
    if block_table is None:
        return cache[b:b + 1, :, :length]
    block_size = cache.shape[2]
    blocks = block_table[b, :-(-length // block_size)].long()
    return cache[blocks].transpose(0, 1).reshape(1, cache.shape[1], -1, cache.shape[3])[:, :, :length]


def naive_attention_with_kvcache(q, k_cache, v_cache, seqlens_k, block_table=None, causal=True, softmax_scale=None,
                                 upcast=False, return_lse=False, *, window=(-1, -1), softcap=0.0, alibi_slopes=None):
    """``naive_attention`` of q (B, Hq, Nq, D) against each sequence's cached keys: sequence b sees the
    first seqlens_k[b] keys of its cache (dense or paged, see ``cache_keys``), positions bottom-right
    (shift = seqlens_k[b] - Nq). The cache is read, never written (appending is the caller's). Returns o
    (B, Hq, Nq, D) and, with ``return_lse``, lse float32 (B, Hq, Nq); rows that see no key give 0 and -inf."""
    dtype = torch.float32 if upcast else q.dtype
    o = q.new_zeros(q.shape, dtype=dtype)
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device, dtype=torch.promote_types(dtype, torch.float32))
    for b, length in enumerate(seqlens_k.tolist()):
        if length == 0:
            continue
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        o[b], lse[b] = (t[0] for t in naive_attention(
            q[b:b + 1], cache_keys(k_cache, block_table, b, length), cache_keys(v_cache, block_table, b, length),
            causal, softmax_scale, upcast, return_lse=True, window=window, softcap=softcap, alibi_slopes=slopes))
    return (o, lse) if return_lse else o
