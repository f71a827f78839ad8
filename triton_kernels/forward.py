"""Flash-attention forward in Triton: one program per (batch, head, query tile), online softmax over key tiles."""
import torch
import triton
import triton.language as tl

from .common import (
    LN2,
    LOG2E,
    KernelConfigs,
    alibi_slope_log2,
    dot_precision,
    dropout_keep,
    kernel_strides,
    key_range,
    load_row_tile,
    load_rows,
    modified_scores,
    n_bucket,
    new_rows,
    option_arguments,
    padded_head_dim,
    program_grid,
    program_tile,
    query_tile_shared_memory,
    real_key_bounds,
    real_keys,
    sequence,
    store_rows,
    uses_tma,
    visible,
)


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim; see KernelConfigs for what they are held to.
CONFIGS = KernelConfigs(
    tensor_core={
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
        256: [(64, 32, 8, 2), (64, 64, 8, 2)],
    },
    fp32=[(32, 32, 4, 2), (32, 16, 8, 2), (16, 16, 4, 2)],
    shared_memory=query_tile_shared_memory,
    interpreter_shape=(32, 16, 4, 1),
)


@triton.autotune(
    configs=CONFIGS.all(),
    # The lengths only as buckets (n_bucket): retuning and recompiling for every new length would stall
    # training on variable-length batches. The autotuner adds the tensors' dtypes to the key itself.
    key=["BLOCK_D", "CAUSAL", "PADDED", "VARLEN", "WINDOW", "SOFTCAP", "ALIBI", "DROPOUT", "TMA", "q_bucket", "k_bucket"],
    prune_configs_by={"early_config_prune": CONFIGS.prune},
)
# A new seed or offset (every training step) must not compile a new specialization.
@triton.jit(do_not_specialize=["dropout_seed", "dropout_offset"])
def _forward_kernel(
    Q, K, V, O, LSE,
    KEY_MASK,  # PADDED: the bool (B, n_k) key padding mask, True for a real key
    KEY_BOUNDS,  # PADDED: int32 (B, 2), each batch element's first real key and last real key + 1
    CU_SEQLENS_Q, CU_SEQLENS_K,  # VARLEN: int32 (B + 1,) first rows of the sequences in the packed tensors
    ALIBI_SLOPES,  # ALIBI: float32 (B, n_heads)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_lseb, stride_lseh,
    n_heads, group, n_q, n_k,  # VARLEN: n_q, n_k are the longest sequences' lengths, for the grid
    q_bucket, k_bucket,  # autotune key only
    scale_log2,  # softmax scale times log2(e): scores come out in base 2, ready for exp2
    window_left, window_right,  # WINDOW: keys seen before and after the diagonal (see `visible`)
    softcap_log2,  # SOFTCAP: softcap times log2(e)
    dropout_seed: tl.int64, dropout_offset: tl.int64,  # DROPOUT: the Philox key and counter word 3
    dropout_threshold: tl.int64,  # DROPOUT: the smallest kept Philox word, floor(p * 2**32)
    dropout_scale,  # DROPOUT: 1 / (1 - p)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    VARLEN: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,  # Q, K and V tiles through TMA descriptors (sm_90+), not masked pointer loads
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m, batch, head = program_tile(n_q, n_heads, BLOCK_M)
    q_first, n_q = sequence(CU_SEQLENS_Q, batch, n_q, VARLEN)
    k_first, n_k = sequence(CU_SEQLENS_K, batch, n_k, VARLEN)
    if VARLEN:
        if start_m >= n_q:  # the grid is sized for the longest query sequence
            return
    kv_head = head // group  # grouped-query attention: `group` query heads share one K/V head
    q_base = Q + batch * stride_qb + head * stride_qh + q_first * stride_qn
    k_base = K + batch * stride_kb + kv_head * stride_kh + k_first * stride_kn
    v_base = V + batch * stride_vb + kv_head * stride_vh + k_first * stride_vn
    if PADDED:
        key_mask_row = KEY_MASK + batch * n_k
        key_bounds = KEY_BOUNDS + 2 * batch
    else:  # None: unused
        key_mask_row = KEY_MASK
        key_bounds = KEY_BOUNDS

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if TMA:
        # Descriptors of this sequence's rows of this head: TMA fills the rows past the sequence and the
        # columns past HEAD_DIM with zeros, the masks of the pointer path.
        q = tl.make_tensor_descriptor(q_base, [n_q, HEAD_DIM], [stride_qn, 1], [BLOCK_M, BLOCK_D]).load([start_m, 0])
        k_rows = tl.make_tensor_descriptor(k_base, [n_k, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_rows = tl.make_tensor_descriptor(v_base, [n_k, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])
    else:
        q = load_rows(q_base, offs_m, stride_qn, n_q, offs_d, HEAD_DIM)
        k_rows = k_base
        v_rows = v_base
    if scale_log2 < 0:
        # The unmasked loop takes row maxima of the unscaled scores, right only for a scale >= 0. A negative
        # scale (allowed, if unusual) is folded into q, once per program: negation is exact in every dtype.
        q = -q
        scale_log2 = -scale_log2
    # The options' per-program values, bundled for the loops (unused ones are never read).
    slope_log2 = alibi_slope_log2(ALIBI_SLOPES, batch, head, n_heads, ALIBI)
    scores = (window_left, window_right, softcap_log2, slope_log2)
    dropout = (dropout_seed, dropout_offset, batch * n_heads + head, dropout_threshold)

    # Running row max (base-2 units), row sum of exp2(score - max), and the unnormalized output.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    start_n, unmasked_start, unmasked_end, visible_end = key_range(
        start_m, n_q, n_k, key_bounds, window_left, window_right, BLOCK_M, BLOCK_N, CAUSAL, PADDED, WINDOW)
    if WINDOW:  # the tiles left of those every query sees whole
        acc, l_i, m_i = _attend_key_tiles(
            acc, l_i, m_i, q, k_rows, v_rows, key_mask_row, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k,
            scale_log2, scores, dropout, start_n, unmasked_start, True, CAUSAL, PADDED, WINDOW, SOFTCAP, ALIBI,
            DROPOUT, HEAD_DIM, DOT_PRECISION, TMA, BLOCK_N,
        )
    acc, l_i, m_i = _attend_key_tiles(
        acc, l_i, m_i, q, k_rows, v_rows, key_mask_row, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k,
        scale_log2, scores, dropout, unmasked_start, unmasked_end, False, CAUSAL, PADDED, WINDOW, SOFTCAP, ALIBI,
        DROPOUT, HEAD_DIM, DOT_PRECISION, TMA, BLOCK_N,
    )
    acc, l_i, m_i = _attend_key_tiles(
        acc, l_i, m_i, q, k_rows, v_rows, key_mask_row, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k,
        scale_log2, scores, dropout, unmasked_end, visible_end, True, CAUSAL, PADDED, WINDOW, SOFTCAP, ALIBI,
        DROPOUT, HEAD_DIM, DOT_PRECISION, TMA, BLOCK_N,
    )

    # l_i is 0 exactly for rows that saw no key (any visible key adds exp2(0) = 1): output 0, lse -inf.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    if DROPOUT:  # acc summed the kept P only; l_i all of them, as lse must
        o = acc * (dropout_scale / l_safe)[:, None]
    else:
        o = acc / l_safe[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)

    o_base = O + batch * stride_ob + head * stride_oh + q_first * stride_on
    store_rows(o_base, o.to(O.dtype.element_ty), offs_m, stride_on, n_q, offs_d, HEAD_DIM)
    lse_base = LSE + batch * stride_lseb + head * stride_lseh + q_first
    tl.store(lse_base + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def _attend_key_tiles(
    acc, l_i, m_i, q, k_rows, v_rows, key_mask_row, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k, scale_log2,
    scores, dropout, start, end,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fold key tiles [start, end) into the online softmax state; mask scores only when MASKED.

    k_rows, v_rows: TMA descriptors (TMA) or the first rows' pointers. scores: (window_left, window_right,
    softcap_log2, slope_log2) and dropout: (seed, offset, batch * Hq + head, threshold), the option values
    _forward_kernel bundles.
    """
    window_left, window_right, softcap_log2, slope_log2 = scores
    seed, offset, batch_head, threshold = dropout
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_row_tile(k_rows, start_n, offs_n, stride_kn, n_k, offs_d, HEAD_DIM, TMA)
        v = load_row_tile(v_rows, start_n, offs_n, stride_vn, n_k, offs_d, HEAD_DIM, TMA)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            real = real_keys(key_mask_row, offs_n, n_k, PADDED)
            s, _ = modified_scores(qk, offs_m[:, None], offs_n[None, :], n_k - n_q, scale_log2, softcap_log2,
                                   slope_log2, SOFTCAP, ALIBI)
            s = tl.where(visible(offs_m[:, None], offs_n[None, :], real[None, :], n_q, n_k, window_left,
                                 window_right, CAUSAL, WINDOW), s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no visible key so far has m_new = -inf, and -inf - -inf is NaN: subtract 0 instead,
            # so its p and alpha come out exp2(-inf) = 0.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
        elif SOFTCAP or ALIBI:
            # Every key visible, so m_new is finite; the row maxima are those of the modified scores.
            s, _ = modified_scores(qk, offs_m[:, None], offs_n[None, :], n_k - n_q, scale_log2, softcap_log2,
                                   slope_log2, SOFTCAP, ALIBI)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_shift = m_new
            p = tl.math.exp2(s - m_shift[:, None])
        else:
            # Every key visible, so m_new is finite; scaling and subtracting the max is one FMA per score
            # (scale_log2 >= 0: the max of the unscaled scores gives the max of the scaled ones).
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_shift = m_new
            p = tl.math.exp2(qk * scale_log2 - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            p = tl.where(dropout_keep(seed, offset, batch_head, offs_m, start_n, threshold, BLOCK_N), p, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def attention_forward(q, k, v, causal: bool, softmax_scale: float, key_padding_mask=None, cu_seqlens_q=None,
                      cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, window_left=-1, window_right=-1,
                      softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=0, dropout_offset=0):
    """Fused attention forward, validated by the caller.

    Dense (cu_seqlens None): q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) with Hq % Hkv == 0; query head h
    reads K/V head h // (Hq // Hkv). key_padding_mask: None or a contiguous bool (B, Nk), True for a real
    key. Varlen: q (1, Hq, total_q, D), k and v (1, Hkv, total_k, D), views of flash-attn's packed
    (total, H, D) tensors; sequence b is rows cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of q (likewise k),
    at most max_seqlen_q (max_seqlen_k) long. q, k, v share device and dtype (fp16, bf16 or fp32) and D
    (<= 256); any strides with a contiguous last dim. Causal is bottom-right aligned (per sequence).
    The score options, as the Python layer guarantees them (SPEC11): window_left, window_right >= -1 (-1:
    unbounded; causal is window_right 0), softcap >= 0 (0: off), alibi_slopes None or contiguous float32
    (B, Hq) (B: sequences in varlen), 0 <= dropout_p < 1 with dropout_seed in [0, 2**63) and dropout_offset
    in [0, 2**32) (attention.dropout's Philox keep-mask; positions counted within each sequence).
    Returns o: new (B, Hq, Nq, D) in q.dtype, contiguous (varlen: a view of a contiguous (total_q, Hq, D)),
    and lse: new contiguous float32 (B, Hq, Nq), the natural log of sum_j exp(s_ij) over the visible keys of
    the modified scores s (dropout leaves it alone); -inf (and o = 0) for rows that see no key.
    """
    rows_batch, heads, rows_q, head_dim = q.shape
    kv_heads, rows_k = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    if varlen:
        batch, n_q, n_k = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
    else:
        batch, n_q, n_k = rows_batch, rows_q, rows_k
    o = new_rows(rows_batch, heads, rows_q, head_dim, varlen, q)
    lse = torch.empty((rows_batch, heads, rows_q), device=q.device, dtype=torch.float32)
    if batch * n_q == 0:
        return o, lse  # no query rows: CUDA refuses an empty grid
    tma = uses_tma(q, k, v)

    _forward_kernel[program_grid(n_q, heads, batch, "BLOCK_M")](
        q, k, v, o, lse,
        key_padding_mask, None if key_padding_mask is None else real_key_bounds(key_padding_mask),
        cu_seqlens_q, cu_seqlens_k,
        alibi_slopes,
        *kernel_strides(q, varlen),
        *kernel_strides(k, varlen),
        *kernel_strides(v, varlen),
        *kernel_strides(o, varlen),
        *kernel_strides(lse, varlen),
        heads, heads // kv_heads, n_q, n_k,
        n_bucket(n_q), n_bucket(n_k),
        softmax_scale * LOG2E.value,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        PADDED=key_padding_mask is not None,
        VARLEN=varlen,
        DOT_PRECISION=dot_precision(q.dtype),
        TMA=tma,
        **option_arguments(causal, n_q, n_k, window_left, window_right, softcap, alibi_slopes, dropout_p,
                           dropout_seed, dropout_offset),
    )
    return o, lse
