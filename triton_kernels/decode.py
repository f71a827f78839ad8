"""KV-cache decoding in Triton (flash-decoding): one program per (sequence, KV head, row tile, key split).

A program packs the rows of every query head of its KV head into one tile, so each K/V row of a split is
read once for all of them, and attends to one contiguous chunk of its sequence's keys; the launcher's
caller merges the splits' partial results by their lse (attention/merge.py).
"""
import torch
import triton
import triton.language as tl

from .common import (
    LN2,
    LOG2E,
    KernelConfigs,
    alibi_slope_log2,
    dot_precision,
    key_range,
    modified_scores,
    n_bucket,
    option_arguments,
    padded_head_dim,
    program_tile,
    query_tile_shared_memory,
    visible,
)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim; see KernelConfigs for what they are held to.
# BLOCK_M is the row tile `row_tile` picks, not tuned: 16 (tl.dot's least) holds the usual decode step, a
# few query heads of one query row each; 64 serves longer groups of rows. One config per row tile and head
# dim: nothing to benchmark on a decode step's first call. Each K/V tile is 16 KiB or 32 KiB (bf16): a few
# in flight per SM keep a memory-bound step near the device's bandwidth. On sm_90 the 16-row tiles run
# mma.sync (wgmma takes 64 rows per warp group), whose cost hides under the loads.
CONFIGS = KernelConfigs(
    tensor_core={
        64: [(16, 64, 4, 3), (64, 64, 4, 3)],
        128: [(16, 64, 4, 3), (64, 64, 8, 3)],
        256: [(16, 32, 4, 3), (64, 32, 8, 2)],
    },
    fp32=[(16, 32, 4, 2), (64, 16, 4, 2)],
    shared_memory=query_tile_shared_memory,
    interpreter_shape=(16, 16, 4, 1),
)


def row_tile(rows: int) -> int:
    """BLOCK_M for a program's `rows` = group * Nq packed query rows: one tile of 16 when they fit it, else
    tiles of 64 (K/V rows are then read once per tile)."""
    return 16 if rows <= 16 else 64


def _prune(configs, named_args, **kwargs):
    """CONFIGS.prune, then the configs of the call's row tile (all kept ones if none has it)."""
    kept = CONFIGS.prune(configs, named_args, **kwargs)
    tile = {**named_args, **kwargs}["row_tile"]
    return [c for c in kept if c.kwargs["BLOCK_M"] == tile] or kept


@triton.autotune(
    configs=CONFIGS.all(),
    # The split's length only as a bucket (n_bucket): a cache that grows by one key per step must not
    # retune and recompile every step. The autotuner adds the tensors' dtypes to the key itself.
    key=["BLOCK_D", "PAGED", "CAUSAL", "WINDOW", "SOFTCAP", "ALIBI", "row_tile", "split_bucket"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit
def _decode_kernel(
    Q, K_CACHE, V_CACHE, O_PARTS, LSE_PARTS,
    SEQLENS_K,  # int32 (B,): sequence b attends to its keys 0 .. SEQLENS_K[b] - 1
    BLOCK_TABLE,  # PAGED: int32 (B, max_blocks), the cache blocks of each sequence in key order
    ALIBI_SLOPES,  # ALIBI: float32 (B, n_heads)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,  # stride_kb, stride_vb: of a batch element (dense) or a block (PAGED)
    stride_vb, stride_vh, stride_vn,
    stride_os, stride_ob, stride_oh, stride_on,
    stride_lses, stride_lseb, stride_lseh,
    stride_tableb,
    n_heads, kv_heads, group, n_q, block_size, num_splits,
    row_tile, split_bucket,  # autotune key only
    scale_log2,  # softmax scale times log2(e): scores come out in base 2, ready for exp2
    window_left, window_right,  # WINDOW: keys seen before and after the diagonal (see `visible`)
    softcap_log2,  # SOFTCAP: softcap times log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGED: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_r, batch, kv_head = program_tile(group * n_q, kv_heads, BLOCK_M)
    split = tl.program_id(1)
    # Rows query-major: row r is query r // group of query head kv_head * group + r % group, so that a
    # tile's rows hold a contiguous range of queries, at most BLOCK_M of them from start_r // group on:
    # key_range's query tile, which may only widen the keys it returns.
    offs_r = start_r + tl.arange(0, BLOCK_M)
    query = offs_r // group
    head = kv_head * group + offs_r % group
    real_row = query < n_q
    offs_d = tl.arange(0, BLOCK_D)
    in_head = offs_d < HEAD_DIM
    q_rows = batch * stride_qb + head * stride_qh + query.to(tl.int64) * stride_qn
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=real_row[:, None] & in_head[None, :], other=0.0)
    slope_log2 = alibi_slope_log2(ALIBI_SLOPES, batch, head, n_heads, ALIBI)
    if ALIBI:
        slope_log2 = slope_log2[:, None]  # one slope per row, i.e. per query head

    n_k = tl.load(SEQLENS_K + batch)
    # The split's chunk of keys: a whole number of key tiles, so that its tiles are key_range's.
    chunk = tl.cdiv(tl.cdiv(n_k, num_splits), BLOCK_N) * BLOCK_N
    chunk_start = split * chunk
    start, _, _, visible_end = key_range(start_r // group, n_q, n_k, None, window_left, window_right, BLOCK_M,
                                         BLOCK_N, CAUSAL, False, WINDOW)
    k_head = K_CACHE + kv_head * stride_kh
    v_head = V_CACHE + kv_head * stride_vh
    if PAGED:
        blocks = BLOCK_TABLE + batch * stride_tableb
    else:
        k_head += batch * stride_kb
        v_head += batch * stride_vb

    # Running row max (base-2 units), row sum of exp2(score - max), and the unnormalized output.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Every tile is masked: a decode step is bound by the K/V reads, the masks' arithmetic hides under them.
    first_tile = tl.maximum(start, chunk_start)
    # PAGED: each key row's block, for any block size. A tile's block ids are loaded one tile ahead: K/V
    # loads whose addresses wait on a load of the same iteration are pipelined one stage shallower.
    if PAGED:
        next_keys = first_tile + tl.arange(0, BLOCK_N)
        next_block = tl.load(blocks + next_keys // block_size, mask=next_keys < n_k, other=0)
    for start_n in range(first_tile, tl.minimum(visible_end, chunk_start + chunk), BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        real = keys < n_k
        if PAGED:
            block = next_block.to(tl.int64)
            next_keys = keys + BLOCK_N
            next_block = tl.load(blocks + next_keys // block_size, mask=next_keys < n_k, other=0)
            slot = (keys % block_size).to(tl.int64)
            k_rows = block * stride_kb + slot * stride_kn
            v_rows = block * stride_vb + slot * stride_vn
        else:
            k_rows = keys.to(tl.int64) * stride_kn
            v_rows = keys.to(tl.int64) * stride_vn
        # Rows past the sequence hold anything (NaN in the tests): loaded as 0, never summed.
        kv_mask = real[:, None] & in_head[None, :]
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_head + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s = modified_scores(qk, query[:, None], keys[None, :], n_k - n_q, scale_log2, softcap_log2, slope_log2,
                            SOFTCAP, ALIBI)[0]
        s = tl.where(visible(query[:, None], keys[None, :], real[None, :], n_q, n_k, window_left, window_right, CAUSAL,
                             WINDOW), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key so far has m_new = -inf, and -inf - -inf is NaN: subtract 0 instead,
        # so its p and alpha come out exp2(-inf) = 0.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # l_i is 0 exactly for rows that saw no key of the chunk (any visible key adds exp2(0) = 1): o 0, lse -inf.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)
    out_rows = split.to(tl.int64) * stride_os + batch * stride_ob + head * stride_oh + query.to(tl.int64) * stride_on
    tl.store(O_PARTS + out_rows[:, None] + offs_d[None, :], o, mask=real_row[:, None] & in_head[None, :])
    lse_rows = split.to(tl.int64) * stride_lses + batch * stride_lseb + head * stride_lseh + query
    tl.store(LSE_PARTS + lse_rows, lse, mask=real_row)


# CUDA's grid y, where the splits go.
MAX_SPLITS = 65535


def attention_decode(q, k_cache, v_cache, seqlens_k, block_table, causal: bool, softmax_scale: float,
                     window_left: int, window_right: int, softcap: float, alibi_slopes, num_splits: int):
    """Attention of q against a KV cache, its keys split num_splits ways; the fwd_kvcache op's contract
    (csrc/checks.h, check_kvcache_inputs), validated by the caller.

    q (B, Hq, Nq, D) with a contiguous last dim; k_cache, v_cache dense (B, Hkv, Ncache, D) or, with
    block_table int32 (B, max_blocks), paged (num_blocks, Hkv, block_size, D), any block size; last dims
    contiguous, read in place. seqlens_k int32 (B,): sequence b attends to its keys 0 .. seqlens_k[b] - 1,
    positions bottom-right (shift seqlens_k[b] - Nq). The score options are attention_forward's.
    Returns o_parts float32 (num_splits, B, Hq, Nq, D) and lse_parts float32 (num_splits, B, Hq, Nq), new and
    contiguous: part s attends to the s-th chunk of ceil(seqlens_k[b] / num_splits) keys rounded up to the
    key tile, o normalised over its keys, lse their natural-log sum of exp; o 0 and lse -inf where a part
    sees no key.
    """
    if num_splits > MAX_SPLITS:
        raise ValueError(f"num_splits must be at most {MAX_SPLITS} for the Triton kernel, got {num_splits}")
    batch, heads, n_q, head_dim = q.shape
    kv_heads = k_cache.shape[1]
    group = heads // kv_heads
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    o_parts = torch.empty((num_splits, batch, heads, n_q, head_dim), device=q.device, dtype=torch.float32)
    lse_parts = torch.empty((num_splits, batch, heads, n_q), device=q.device, dtype=torch.float32)
    if batch * n_q == 0:
        return o_parts, lse_parts  # no query rows: CUDA refuses an empty grid

    rows = group * n_q
    # Decode has no dropout: its options are left out.
    options = {name: value for name, value in option_arguments(
        causal, n_q, capacity, window_left, window_right, softcap, alibi_slopes, 0.0, 0, 0).items()
        if "dropout" not in name.lower()}
    _decode_kernel[lambda meta: (triton.cdiv(rows, meta["BLOCK_M"]) * kv_heads * batch, num_splits)](
        q, k_cache, v_cache, o_parts, lse_parts,
        seqlens_k, block_table, alibi_slopes,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        o_parts.stride(0), o_parts.stride(1), o_parts.stride(2), o_parts.stride(3),
        lse_parts.stride(0), lse_parts.stride(1), lse_parts.stride(2),
        block_table.stride(0) if paged else 0,
        heads, kv_heads, group, n_q, k_cache.shape[2], num_splits,
        row_tile(rows), n_bucket(triton.cdiv(capacity, num_splits)),
        softmax_scale * LOG2E.value,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        PAGED=paged,
        DOT_PRECISION=dot_precision(q.dtype),
        **options,
    )
    return o_parts, lse_parts
