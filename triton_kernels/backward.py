"""Flash-attention backward in Triton: by default three deterministic kernels (no atomics).

1. delta = rowsum(dO * O), the softmax-gradient term every score of a row shares.
2. dK, dV: one program per key tile of a K/V head, looping over the query heads that read that K/V head
   (several with grouped-query attention) and the query tiles that see the key tile. Above head dim 128,
   two launches, one for dV and one for dK (dkdv_passes: 8 matmuls per tile pair in all).
3. dQ: one program per query tile, looping over the key tiles it sees.
Both loops rebuild P = exp2(scale_log2 * q.k - lse_log2) from the forward's lse instead of storing P.
Splitting dK/dV from dQ costs one extra recomputation of P (7 matmuls per tile pair instead of 5) but
lets each kernel own its accumulators in registers and write them once. With deterministic=False (at
head dims up to 128, FUSED_DKDV_CONFIGS) the dK/dV kernel also adds dQ into a float32 buffer, atomically
or through TMA reductions, and kernel 3 is skipped.
"""
import torch
import triton
import triton.language as tl

from .common import (
    INTERPRETING,
    LOG2E,
    TMA_SHARED_BYTES,
    KernelConfigs,
    alibi_slope_log2,
    any_key,
    dot_precision,
    distinct,
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
    query_range,
    real_key_bounds,
    real_keys,
    sequence,
    store_rows,
    uses_tma,
    visible,
)

DELTA_BLOCK_M = 16 if INTERPRETING else 64


def _dkdv_shared_memory(config, block_d, element_bytes):
    """Q and dO tiles per pipeline stage and the resident K and V tiles."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    tiles = 2 * config.num_stages * block_m * block_d + 2 * block_n * block_d
    return tiles * element_bytes


def _dq_shared_memory(config, block_d, element_bytes):
    """K and V tiles per pipeline stage and the resident Q and dO tiles."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    tiles = 2 * config.num_stages * block_n * block_d + 2 * block_m * block_d
    return tiles * element_bytes


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim; see KernelConfigs for what they are held to.
# dK/dV keeps a key tile and two fp32 accumulators (one per pass above head dim 128) resident and streams query
# tiles; dQ is the mirror image.
DKDV_CONFIGS = KernelConfigs(
    tensor_core={
        64: [(32, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 3)],
        128: [(32, 128, 8, 3, 90), (16, 128, 8, 2), (32, 64, 4, 3), (16, 64, 4, 2)],  # 90: spills on sm_80
        # Run by each of dkdv_passes' two passes (benchmarks/NOTES.md); 90: past sm_80's shared memory.
        256: [(16, 64, 8, 2), (16, 128, 8, 2), (32, 128, 8, 2, 90)],
    },
    fp32=[(16, 32, 8, 2), (16, 16, 8, 2), (16, 16, 4, 2)],
    shared_memory=_dkdv_shared_memory,
    interpreter_shape=(16, 32, 4, 1),
)


# Up to this padded head dim the dK/dV kernel computes both in one pass. Above, two (BLOCK_N, BLOCK_D) fp32
# accumulators spill on sm_90 with every tile tried (benchmarks/NOTES.md): one launch computes dK and a
# second dV, recomputing sT = k.qT (5 matmuls per tile pair instead of 4), each holding one accumulator.
DKDV_ONE_PASS_HEAD_DIM = 128


def _dv_pass_shared_memory(config, block_d, element_bytes):
    """dV's pass (dkdv_passes) loads no V tile."""
    return _dkdv_shared_memory(config, block_d, element_bytes) - config.kwargs["BLOCK_N"] * block_d * element_bytes


DV_PASS_CONFIGS = DKDV_CONFIGS.with_shared_memory(_dv_pass_shared_memory)


def dkdv_passes(block_d):
    """(WITH_DK, WITH_DV) of each launch of the dK/dV kernel at a padded head dim. dK's pass, which adds the
    fused dQ, runs last: the autotuner zeroes DQ_ACCUM before it tunes a launch (reset_to_zero)."""
    return [(True, True)] if block_d <= DKDV_ONE_PASS_HEAD_DIM else [(False, True), (True, False)]


def _fused_dkdv_shared_memory(config, block_d, element_bytes):
    """dK/dV's tiles and dS^T, which the fused dQ^T = k^T.dS^T reads from shared memory."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    return _dkdv_shared_memory(config, block_d, element_bytes) + block_n * block_m * element_bytes


def _fused_dkdv_mma_sync_shared_memory(config, block_d, element_bytes):
    """sm_80's copy of the K tile for kT, dQ^T's left operand: mma.sync reads it from shared memory."""
    return config.kwargs["BLOCK_N"] * block_d * element_bytes


def _fused_dkdv_tma_shared_memory(config, block_d):
    """A TMA build's barriers and its float32 dQ^T tile, staged in shared memory for the TMA reduction."""
    return TMA_SHARED_BYTES + 4 * block_d * config.kwargs["BLOCK_M"]


# deterministic=False: dK/dV with dQ fused in, its own configs. The dQ^T tile (BLOCK_D x BLOCK_M, fp32) is
# live next to dK and dV, so the tiles are smaller than dK/dV's alone; its dot's M is BLOCK_D, so BLOCK_M
# 16 still runs it on wgmma (as it does sT and dpT, with N 16). At head dim 128 every BLOCK_M 32
# shape tried spills with some option; at 256 every shape does, in one pass or fused into dK's pass of
# dkdv_passes (benchmarks/NOTES.md): there deterministic=False runs the deterministic kernels.
FUSED_DKDV_CONFIGS = KernelConfigs(
    tensor_core={
        64: [(64, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 3)],
        128: [(16, 128, 8, 2), (16, 64, 8, 2), (16, 64, 4, 2)],
    },
    fp32=[(16, 32, 8, 2), (16, 16, 8, 2), (16, 16, 4, 2)],
    shared_memory=_fused_dkdv_shared_memory,
    tma_shared_memory=_fused_dkdv_tma_shared_memory,
    mma_sync_shared_memory=_fused_dkdv_mma_sync_shared_memory,
    interpreter_shape=DKDV_CONFIGS.interpreter_shape,
)


DQ_CONFIGS = KernelConfigs(
    tensor_core={
        64: [(128, 32, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
        128: [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 3), (64, 32, 8, 2)],
        256: [(64, 32, 8, 2), (64, 16, 4, 2)],
    },
    fp32=[(32, 32, 4, 2), (32, 16, 4, 2), (16, 16, 4, 2)],
    shared_memory=_dq_shared_memory,
    interpreter_shape=(32, 16, 4, 1),
)


@triton.jit
def _delta_kernel(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_on,
    stride_dob, stride_doh, stride_don,
    n_heads, n_q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    start_m, batch, head = program_tile(n_q, n_heads, BLOCK_M)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = load_rows(O + batch * stride_ob + head * stride_oh, offs_m, stride_on, n_q, offs_d, HEAD_DIM)
    do = load_rows(DO + batch * stride_dob + head * stride_doh, offs_m, stride_don, n_q, offs_d, HEAD_DIM)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (batch * n_heads + head) * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _load_row_stats(LSE, DELTA, row_offset, offs_m, n_q):
    """lse (in base-2 units) and delta of rows offs_m; 0 past n_q, where q = dO = 0 make any P harmless.

    A row that sees no key has lse = -inf and so P = exp2(s - lse) = inf; no guard is needed because each
    of its (row, key) pairs is hidden and lies in a masked tile, where tl.where replaces P by 0.
    """
    in_bounds = offs_m < n_q
    lse = tl.load(LSE + row_offset + offs_m, mask=in_bounds, other=0.0) * LOG2E
    delta = tl.load(DELTA + row_offset + offs_m, mask=in_bounds, other=0.0)
    return lse, delta


def _prune_dkdv(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    if args["FUSED_DQ"]:
        kernel_configs = FUSED_DKDV_CONFIGS
    elif not args["WITH_DK"]:
        kernel_configs = DV_PASS_CONFIGS
    else:
        kernel_configs = DKDV_CONFIGS
    return kernel_configs.prune(configs, named_args, **kwargs)


@triton.autotune(
    configs=distinct(DKDV_CONFIGS.all() + FUSED_DKDV_CONFIGS.all()),
    # lengths as buckets, as in the forward
    key=["BLOCK_D", "CAUSAL", "PADDED", "VARLEN", "WINDOW", "SOFTCAP", "ALIBI", "DROPOUT", "FUSED_DQ", "TMA",
         "WITH_DK", "WITH_DV", "q_bucket", "k_bucket"],
    prune_configs_by={"early_config_prune": _prune_dkdv},
    reset_to_zero=["DQ_ACCUM"],  # the timing runs of the autotuner add to it too
)
@triton.jit(do_not_specialize=["dropout_seed", "dropout_offset"])  # as the forward's
def _dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    DQ_ACCUM,  # FUSED_DQ: float32, zeroed, for dQ / softmax_scale; see new_dq_accumulator
    KEY_MASK,  # PADDED: the bool (B, n_k) key padding mask, True for a real key
    CU_SEQLENS_Q, CU_SEQLENS_K,  # VARLEN: int32 (B + 1,) first rows of the sequences in the packed tensors
    ALIBI_SLOPES,  # ALIBI: float32 (B, n_kv_heads * group)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lseb, stride_lseh,  # of LSE and DELTA, contiguous (B, Hq, rows)
    stride_dqab, stride_dqah, stride_dqad,  # FUSED_DQ: of DQ_ACCUM (stride_dqad: TMA only)
    n_kv_heads, group, n_q, n_k,  # VARLEN: n_q, n_k are the longest sequences' lengths, for the grid
    q_bucket, k_bucket,  # autotune key only
    softmax_scale,
    scale_log2,
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
    FUSED_DQ: tl.constexpr,
    TMA: tl.constexpr,  # tiles through TMA descriptors (sm_90+), as in the forward
    WITH_DK: tl.constexpr,  # which of dK (and, with FUSED_DQ, dQ) and dV this launch computes: dkdv_passes
    WITH_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tl.static_assert(WITH_DK or not FUSED_DQ, "the fused dQ needs dS, which dK's pass computes")
    start_n, batch, kv_head = program_tile(n_k, n_kv_heads, BLOCK_N)
    q_first, n_q = sequence(CU_SEQLENS_Q, batch, n_q, VARLEN)
    k_first, n_k = sequence(CU_SEQLENS_K, batch, n_k, VARLEN)
    if VARLEN:
        if start_n >= n_k:  # the grid is sized for the longest key sequence
            return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    # Keys past n_k load as zeros. Their dK/dV rows may come out inf (P = exp2(-lse) there) but are never
    # stored, and no other row depends on them. Likewise padding keys' rows (unmasked, their P may be inf:
    # lse leaves them out), which the kernel never stores: they stay the launcher's zeros.
    k_base = K + batch * stride_kb + kv_head * stride_kh + k_first * stride_kn
    v_base = V + batch * stride_vb + kv_head * stride_vh + k_first * stride_vn
    # Query rows past n_q need no mask in any loop: their q and dO load as zeros (see _load_row_stats).
    q_base = Q + batch * stride_qb + q_first * stride_qn
    do_base = DO + batch * stride_dob + q_first * stride_don
    if TMA:
        k = tl.make_tensor_descriptor(k_base, [n_k, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D]).load([start_n, 0])
        v = tl.make_tensor_descriptor(v_base, [n_k, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D]).load([start_n, 0])
        # (head, row, column): the loops visit the group's query heads.
        n_heads = n_kv_heads * group
        q_rows = tl.make_tensor_descriptor(q_base, [n_heads, n_q, HEAD_DIM], [stride_qh, stride_qn, 1],
                                           [1, BLOCK_M, BLOCK_D])
        do_rows = tl.make_tensor_descriptor(do_base, [n_heads, n_q, HEAD_DIM], [stride_doh, stride_don, 1],
                                            [1, BLOCK_M, BLOCK_D])
    else:
        k = load_rows(k_base, offs_n, stride_kn, n_k, offs_d, HEAD_DIM)
        v = load_rows(v_base, offs_n, stride_vn, n_k, offs_d, HEAD_DIM)
        q_rows = q_base
        do_rows = do_base
    if PADDED:
        key_mask_row = KEY_MASK + batch * n_k
    else:  # None: unused
        key_mask_row = KEY_MASK
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if PADDED:
        if not any_key(real_keys(key_mask_row, offs_n, n_k, PADDED)):  # padding only: its rows stay zero
            return
    masked_start, unmasked_start, unmasked_end, visible_end = query_range(
        start_n, n_q, n_k, window_left, window_right, BLOCK_M, BLOCK_N, CAUSAL, WINDOW)
    row_offset = batch * stride_lseb + q_first
    first_head = kv_head * group
    # dQ through TMA where it reduces tiles whose first row is 16-byte aligned (4 rows of fp32, in dQ^T's
    # inner dimension), as TMA requires: not varlen's, whose sequences start anywhere.
    DQ_TMA: tl.constexpr = TMA and not VARLEN
    if FUSED_DQ and DQ_TMA:  # (head, column, row)
        dq_rows = tl.make_tensor_descriptor(DQ_ACCUM + batch * stride_dqab,
                                            [n_kv_heads * group, HEAD_DIM, (q_first + n_q).to(tl.int32)],
                                            [stride_dqah, stride_dqad, 1], [1, BLOCK_D, BLOCK_M])
    else:  # (head, row, column), rows HEAD_DIM apart: a constant stride keeps sm_80's addresses spill-free
        dq_rows = DQ_ACCUM + batch * stride_dqab + q_first * HEAD_DIM
    # Where the loops add dQ (FUSED_DQ; unused otherwise).
    dq_out = (dq_rows, stride_dqah, stride_dqad, q_first)
    # The options' values, bundled for the loops (unused ones are never read); the heads' ALiBi slopes and
    # dropout counters are the loop's, which runs over several query heads.
    options = (window_left, window_right, softcap_log2, ALIBI_SLOPES, batch, n_kv_heads * group, dropout_seed,
               dropout_offset, dropout_threshold, dropout_scale)
    dk, dv = _accumulate_dkdv(
        dk, dv, k, v, q_rows, do_rows, stride_qh, stride_qn, stride_doh, stride_don, LSE, DELTA, row_offset,
        stride_lseh, dq_out, first_head, group, start_n, offs_n, offs_d, key_mask_row, n_q, n_k, scale_log2,
        options, masked_start, unmasked_start, True, CAUSAL, PADDED, WINDOW, SOFTCAP, ALIBI, DROPOUT, HEAD_DIM,
        DOT_PRECISION, FUSED_DQ, DQ_TMA, TMA, WITH_DK, WITH_DV, BLOCK_M, BLOCK_N,
    )
    dk, dv = _accumulate_dkdv(
        dk, dv, k, v, q_rows, do_rows, stride_qh, stride_qn, stride_doh, stride_don, LSE, DELTA, row_offset,
        stride_lseh, dq_out, first_head, group, start_n, offs_n, offs_d, key_mask_row, n_q, n_k, scale_log2,
        options, unmasked_start, unmasked_end, False, CAUSAL, PADDED, WINDOW, SOFTCAP, ALIBI, DROPOUT, HEAD_DIM,
        DOT_PRECISION, FUSED_DQ, DQ_TMA, TMA, WITH_DK, WITH_DV, BLOCK_M, BLOCK_N,
    )
    if WINDOW:  # the query tiles below those that see the key tile whole
        dk, dv = _accumulate_dkdv(
            dk, dv, k, v, q_rows, do_rows, stride_qh, stride_qn, stride_doh, stride_don, LSE, DELTA, row_offset,
            stride_lseh, dq_out, first_head, group, start_n, offs_n, offs_d, key_mask_row, n_q, n_k, scale_log2,
            options, unmasked_end, visible_end, True, CAUSAL, PADDED, WINDOW, SOFTCAP, ALIBI, DROPOUT, HEAD_DIM,
            DOT_PRECISION, FUSED_DQ, DQ_TMA, TMA, WITH_DK, WITH_DV, BLOCK_M, BLOCK_N,
        )

    dk_base = DK + batch * stride_dkb + kv_head * stride_dkh + k_first * stride_dkn
    dv_base = DV + batch * stride_dvb + kv_head * stride_dvh + k_first * stride_dvn
    # Padding keys' rows are left alone: the launcher allocated DK and DV zeroed. (Zeroing them here, in
    # registers, costs spills at head dim 128.)
    real = real_keys(key_mask_row, offs_n, n_k, PADDED) if PADDED else None
    if WITH_DK:
        store_rows(dk_base, (dk * softmax_scale).to(DK.dtype.element_ty), offs_n, stride_dkn, n_k, offs_d, HEAD_DIM,
                   real)
    if WITH_DV:
        store_rows(dv_base, dv.to(DV.dtype.element_ty), offs_n, stride_dvn, n_k, offs_d, HEAD_DIM, real)


@triton.jit
def _accumulate_dkdv(
    dk, dv, k, v, q_rows, do_rows, stride_qh, stride_qn, stride_doh, stride_don, LSE, DELTA, row_offset,
    stride_lseh, dq_out, first_head, group, start_n, offs_n, offs_d, key_mask_row, n_q, n_k, scale_log2, options,
    start, end,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    PADDED: tl.constexpr,
    WINDOW: tl.constexpr,
    SOFTCAP: tl.constexpr,
    ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    FUSED_DQ: tl.constexpr,
    DQ_TMA: tl.constexpr,
    TMA: tl.constexpr,
    WITH_DK: tl.constexpr,
    WITH_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Add query tiles [start, end) of query heads first_head .. first_head + group - 1 (those that read this
    K/V head) to dK (unscaled, if WITH_DK) and dV (if WITH_DV); mask (bounds, causal, window) only when MASKED.
    With FUSED_DQ, also add each query tile's share of dQ (unscaled) to DQ_ACCUM, atomically: dq_out is
    (dQ's descriptor if DQ_TMA, else its rows' pointer at head 0; its head and column strides; q_first).

    The group's heads are summed one after the other into the same accumulators: in a fixed order, with no
    atomics. One loop runs over (head, query tile) pairs: a loop over heads around the loop over tiles
    costs dK/dV at head dim 128 register spills on sm_90.

    The scores are kept transposed, keys by queries: sT = k.qT, dpT = v.dOT, dV += pT.dO, dK += dsT.q.
    Every computed tile is then already the left operand its next product needs, where q.kT would need pT
    and dsT transposed in registers (a round trip through shared memory each). The transposes left, of
    q and dO, are of tiles loaded into shared memory for the dots: a change of view, not a copy.

    options: (window_left, window_right, softcap_log2, ALIBI_SLOPES, batch, n_heads, dropout_seed,
    dropout_offset, dropout_threshold, dropout_scale), as _dkdv_kernel bundles them. Dropout: dV takes the
    kept P scaled by 1 / (1 - p), and dP the same factor (SPEC's dP = keep / (1 - p) * dO.v); the keep-mask
    is the forward's, drawn for (query, key) and transposed. Softcap: dS times 1 - tanh^2 of the capped score.
    q_rows, do_rows: (head, row, column) TMA descriptors (TMA), or the rows' pointers at head 0.
    """
    window_left, window_right, softcap_log2, ALIBI_SLOPES, batch, n_heads, seed, offset, threshold, dropout_scale = \
        options
    n_tiles = tl.cdiv(end - start, BLOCK_M)
    for index in range(0, group * n_tiles):
        head = first_head + index // n_tiles
        start_m = start + (index % n_tiles) * BLOCK_M
        offs_m = start_m + tl.arange(0, BLOCK_M)
        if TMA:  # descriptor coordinates are int32; a head index is far below 2**31
            q = q_rows.load([head.to(tl.int32), start_m, 0]).reshape(BLOCK_M, q_rows.block_shape[2])
            do = do_rows.load([head.to(tl.int32), start_m, 0]).reshape(BLOCK_M, do_rows.block_shape[2])
        else:
            q = load_rows(q_rows + head * stride_qh, offs_m, stride_qn, n_q, offs_d, HEAD_DIM)
            do = load_rows(do_rows + head * stride_doh, offs_m, stride_don, n_q, offs_d, HEAD_DIM)
        head_rows = row_offset + head * stride_lseh
        lse, delta = _load_row_stats(LSE, DELTA, head_rows, offs_m, n_q)

        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
        if SOFTCAP or ALIBI:
            slope_log2 = alibi_slope_log2(ALIBI_SLOPES, batch, head, n_heads, ALIBI)
            s_t, tanh_t = modified_scores(s_t, offs_m[None, :], offs_n[:, None], n_k - n_q, scale_log2, softcap_log2,
                                          slope_log2, SOFTCAP, ALIBI)
            p_t = tl.math.exp2(s_t - lse[None, :])
        else:
            p_t = tl.math.exp2(s_t * scale_log2 - lse[None, :])
        if MASKED:
            # Key padding needs no mask here: a padding key's P and dS reach only its own dK/dV rows, which
            # _dkdv_kernel zeroes. Masking them in this loop costs spills (sm_80, head dim 128).
            in_bounds = offs_n[:, None] < n_k
            p_t = tl.where(visible(offs_m[None, :], offs_n[:, None], in_bounds, n_q, n_k, window_left, window_right,
                                   CAUSAL, WINDOW), p_t, 0.0)
        if DROPOUT:
            keep_t = tl.trans(dropout_keep(seed, offset, batch * n_heads + head, offs_m, start_n, threshold, BLOCK_N))
        if WITH_DV:
            if DROPOUT:
                dv = tl.dot((tl.where(keep_t, p_t, 0.0) * dropout_scale).to(do.dtype), do, dv,
                            input_precision=DOT_PRECISION)
            else:
                dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        if WITH_DK:
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
            if DROPOUT:
                dp_t = tl.where(keep_t, dp_t * dropout_scale, 0.0)
            ds_t = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_t = ds_t * (1.0 - tanh_t * tanh_t)
            dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
        if FUSED_DQ:  # WITH_DK: it needs ds_t
            # Keys past n_k load as zeros but their ds may be inf (see _dkdv_kernel), and padding keys are
            # unmasked: drop both before they meet k. Every key tile's program adds to these rows, so the
            # order of the float32 additions, and the last bits of dQ, vary from run to run. dQ is computed
            # transposed, dQT = kT.dsT, so that dsT is the right operand as it stands (dQ = ds.k would
            # transpose it in registers, through shared memory).
            ds_t = tl.where(real_keys(key_mask_row, offs_n, n_k, PADDED)[:, None], ds_t, 0.0)
            dq_t = tl.dot(tl.trans(k), ds_t.to(k.dtype), input_precision=DOT_PRECISION)
            dq_rows, stride_dqah, stride_dqad, q_first = dq_out
            if DQ_TMA:  # a bulk reduction: no per-element addresses in registers
                dq_rows.atomic_add([head.to(tl.int32), 0, (q_first + start_m).to(tl.int32)],
                                   dq_t.reshape(1, dq_rows.block_shape[1], BLOCK_M))
            else:
                mask = (offs_d[:, None] < HEAD_DIM) & (offs_m[None, :] < n_q)
                tl.atomic_add(dq_rows + head * stride_dqah + offs_d[:, None]
                              + offs_m[None, :].to(tl.int64) * HEAD_DIM, dq_t, mask=mask)
    return dk, dv


@triton.autotune(
    configs=DQ_CONFIGS.all(),
    key=["BLOCK_D", "CAUSAL", "PADDED", "VARLEN", "WINDOW", "SOFTCAP", "ALIBI", "DROPOUT", "TMA", "q_bucket",
         "k_bucket"],
    prune_configs_by={"early_config_prune": DQ_CONFIGS.prune},
)
@triton.jit(do_not_specialize=["dropout_seed", "dropout_offset"])  # as the forward's
def _dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    KEY_MASK,  # PADDED: the bool (B, n_k) key padding mask, True for a real key
    KEY_BOUNDS,  # PADDED: int32 (B, 2), each batch element's first real key and last real key + 1
    CU_SEQLENS_Q, CU_SEQLENS_K,  # VARLEN: int32 (B + 1,) first rows of the sequences in the packed tensors
    ALIBI_SLOPES,  # ALIBI: float32 (B, n_heads)
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_don,
    stride_dqb, stride_dqh, stride_dqn,
    stride_lseb, stride_lseh,  # of LSE and DELTA, contiguous (B, Hq, rows)
    n_heads, group, n_q, n_k,  # VARLEN: n_q, n_k are the longest sequences' lengths, for the grid
    q_bucket, k_bucket,  # autotune key only
    softmax_scale,
    scale_log2,
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
    TMA: tl.constexpr,  # tiles through TMA descriptors (sm_90+), as in the forward
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m, batch, head = program_tile(n_q, n_heads, BLOCK_M)
    q_first, n_q = sequence(CU_SEQLENS_Q, batch, n_q, VARLEN)
    k_first, n_k = sequence(CU_SEQLENS_K, batch, n_k, VARLEN)
    if VARLEN:
        if start_m >= n_q:  # the grid is sized for the longest query sequence
            return
    kv_head = head // group
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
    q_base = Q + batch * stride_qb + head * stride_qh + q_first * stride_qn
    do_base = DO + batch * stride_dob + head * stride_doh + q_first * stride_don
    if TMA:
        q = tl.make_tensor_descriptor(q_base, [n_q, HEAD_DIM], [stride_qn, 1], [BLOCK_M, BLOCK_D]).load([start_m, 0])
        do = tl.make_tensor_descriptor(do_base, [n_q, HEAD_DIM], [stride_don, 1], [BLOCK_M, BLOCK_D]).load([start_m, 0])
        k_rows = tl.make_tensor_descriptor(k_base, [n_k, HEAD_DIM], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_rows = tl.make_tensor_descriptor(v_base, [n_k, HEAD_DIM], [stride_vn, 1], [BLOCK_N, BLOCK_D])
    else:
        q = load_rows(q_base, offs_m, stride_qn, n_q, offs_d, HEAD_DIM)
        do = load_rows(do_base, offs_m, stride_don, n_q, offs_d, HEAD_DIM)
        k_rows = k_base
        v_rows = v_base
    lse, delta = _load_row_stats(LSE, DELTA, batch * stride_lseb + head * stride_lseh + q_first, offs_m, n_q)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Same key ranges as the forward. Keys past n_k must be masked here: with zero k their P would be
    # exp2(-lse), which overflows to inf for very negative lse and turns into NaN against k = 0.
    start_n, unmasked_start, unmasked_end, visible_end = key_range(
        start_m, n_q, n_k, key_bounds, window_left, window_right, BLOCK_M, BLOCK_N, CAUSAL, PADDED, WINDOW)
    # The options' per-program values, bundled for the loops (unused ones are never read).
    slope_log2 = alibi_slope_log2(ALIBI_SLOPES, batch, head, n_heads, ALIBI)
    options = (window_left, window_right, softcap_log2, slope_log2, dropout_seed, dropout_offset,
               batch * n_heads + head, dropout_threshold, dropout_scale)
    if WINDOW:  # the key tiles left of those every query sees whole
        dq = _accumulate_dq(
            dq, q, do, lse, delta, k_rows, v_rows, key_mask_row, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k,
            scale_log2, options, start_n, unmasked_start, True, CAUSAL, PADDED, WINDOW, SOFTCAP, ALIBI, DROPOUT,
            HEAD_DIM, DOT_PRECISION, TMA, BLOCK_N,
        )
    dq = _accumulate_dq(
        dq, q, do, lse, delta, k_rows, v_rows, key_mask_row, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k,
        scale_log2, options, unmasked_start, unmasked_end, False, CAUSAL, PADDED, WINDOW, SOFTCAP, ALIBI, DROPOUT,
        HEAD_DIM, DOT_PRECISION, TMA, BLOCK_N,
    )
    dq = _accumulate_dq(
        dq, q, do, lse, delta, k_rows, v_rows, key_mask_row, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k,
        scale_log2, options, unmasked_end, visible_end, True, CAUSAL, PADDED, WINDOW, SOFTCAP, ALIBI, DROPOUT,
        HEAD_DIM, DOT_PRECISION, TMA, BLOCK_N,
    )

    dq_base = DQ + batch * stride_dqb + head * stride_dqh + q_first * stride_dqn
    store_rows(dq_base, (dq * softmax_scale).to(DQ.dtype.element_ty), offs_m, stride_dqn, n_q, offs_d, HEAD_DIM)


@triton.jit
def _accumulate_dq(
    dq, q, do, lse, delta, k_rows, v_rows, key_mask_row, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k, scale_log2,
    options, start, end,
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
    """Add key tiles [start, end) to dQ (unscaled); mask keys (bounds, causal, window, padding) only when
    MASKED. k_rows, v_rows: TMA descriptors (TMA) or the first rows' pointers. options: (window_left,
    window_right, softcap_log2, slope_log2, dropout_seed, dropout_offset, batch * Hq + head, dropout_threshold,
    dropout_scale), as _dq_kernel bundles them; the options' gradient terms as in _accumulate_dkdv."""
    window_left, window_right, softcap_log2, slope_log2, seed, offset, batch_head, threshold, dropout_scale = options
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_row_tile(k_rows, start_n, offs_n, stride_kn, n_k, offs_d, HEAD_DIM, TMA)
        v = load_row_tile(v_rows, start_n, offs_n, stride_vn, n_k, offs_d, HEAD_DIM, TMA)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if SOFTCAP or ALIBI:
            s, tanh_s = modified_scores(s, offs_m[:, None], offs_n[None, :], n_k - n_q, scale_log2, softcap_log2,
                                      slope_log2, SOFTCAP, ALIBI)
            p = tl.math.exp2(s - lse[:, None])
        else:
            p = tl.math.exp2(s * scale_log2 - lse[:, None])
        if MASKED:
            real = real_keys(key_mask_row, offs_n, n_k, PADDED)
            p = tl.where(visible(offs_m[:, None], offs_n[None, :], real[None, :], n_q, n_k, window_left, window_right,
                                 CAUSAL, WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            keep = dropout_keep(seed, offset, batch_head, offs_m, start_n, threshold, BLOCK_N)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


def new_dq_accumulator(batch, heads, rows, head_dim, fused_dq, dq_tma, device):
    """The fused-dQ kernel's float32 accumulator, zeroed (empty, and unused, without FUSED_DQ).

    Through TMA (_dkdv_kernel's DQ_TMA): (batch, heads, head_dim, rows rounded up to 4), dQ transposed as the
    kernel computes it, so that its bulk reduction adds a tile as it stands (TMA's strides must be multiples
    of 16 bytes). Pointers: (batch, heads, rows, head_dim), contiguous.
    """
    if not fused_dq:
        shape = (0, 0, 0, 0)
    elif dq_tma:
        shape = (batch, heads, head_dim, max(4, -(-rows // 4) * 4))  # no rows: still 16-byte strides
    else:
        shape = (batch, heads, rows, head_dim)
    return torch.zeros(shape, device=device, dtype=torch.float32)


def attention_backward(do, q, k, v, o, lse, causal: bool, softmax_scale: float, deterministic: bool = True,
                       key_padding_mask=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0,
                       window_left=-1, window_right=-1, softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=0,
                       dropout_offset=0):
    """Gradients of fused attention: dq, dk, dv new tensors shaped and typed like q, k, v, laid out as
    attention_forward lays out o (contiguous; in varlen, views of contiguous (total, H, D) tensors).

    q, k, v, causal, softmax_scale, key_padding_mask, the varlen arguments and the score options (window,
    softcap, ALiBi, dropout: the forward's keep-mask is drawn again) are the forward's inputs (see
    attention_forward); o and lse (contiguous float32 (B, Hq, Nq)) its outputs. do is the gradient of
    o, any strides with a contiguous last dim. With grouped-query heads, dk and dv sum over the query heads
    of each K/V head, in a fixed order.
    deterministic=True: the dK/dV and dQ kernels each own their accumulators; for a given config the same
    inputs give bitwise the same gradients (the autotuner picks the config per process, so two processes
    may differ). deterministic=False: dQ is added into a float32 buffer with atomics by the dK/dV kernel
    (5 matmuls per tile pair instead of 7, no dQ kernel); dQ's last bits then vary from run to run. Only
    where FUSED_DKDV_CONFIGS serves the head dim (up to 128): above, the deterministic kernels run.
    Above head dim 128 the dK/dV kernel runs twice, for dK and for dV (dkdv_passes).
    """
    rows_batch, heads, rows_q, head_dim = q.shape
    kv_heads, rows_k = k.shape[1], k.shape[2]
    varlen = cu_seqlens_q is not None
    if varlen:
        batch, n_q, n_k = cu_seqlens_q.numel() - 1, max_seqlen_q, max_seqlen_k
    else:
        batch, n_q, n_k = rows_batch, rows_q, rows_k
    padded = key_padding_mask is not None
    key_bounds = real_key_bounds(key_padding_mask) if padded else None
    block_d = padded_head_dim(head_dim)
    precision = dot_precision(q.dtype)
    scale_log2 = softmax_scale * LOG2E.value
    tma = uses_tma(q, k, v, do)
    options = option_arguments(causal, n_q, n_k, window_left, window_right, softcap, alibi_slopes, dropout_p,
                               dropout_seed, dropout_offset)

    # Per row of o: varlen's packed rows need no sequence bounds here.
    delta = torch.empty((rows_batch, heads, rows_q), device=q.device, dtype=torch.float32)
    _delta_kernel[(triton.cdiv(rows_q, DELTA_BLOCK_M) * heads * rows_batch,)](
        o, do, delta,
        o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2),
        heads, rows_q,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=DELTA_BLOCK_M,
    )

    dk = new_rows(rows_batch, kv_heads, rows_k, head_dim, varlen, k)
    dv = new_rows(rows_batch, kv_heads, rows_k, head_dim, varlen, v)
    if padded:  # the dK/dV kernel writes no row of a padding key
        dk.zero_()
        dv.zero_()
    dq = new_rows(rows_batch, heads, rows_q, head_dim, varlen, q)
    if batch * n_k == 0:  # no key rows: nothing reaches dq (CUDA refuses an empty grid)
        return dq.zero_(), dk, dv

    fused_dq = not deterministic and FUSED_DKDV_CONFIGS.serves(block_d)
    dq_tma = tma and not varlen  # as _dkdv_kernel's DQ_TMA
    dq_accum = new_dq_accumulator(rows_batch, heads, rows_q, head_dim, fused_dq, dq_tma, q.device)
    # What both kernels take: the inputs' strides and the constexprs of the call.
    input_strides = [stride for x in (q, k, v, do) for stride in kernel_strides(x, varlen)]
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, PADDED=padded, VARLEN=varlen, DOT_PRECISION=precision,
                      TMA=tma, **options)
    for with_dk, with_dv in dkdv_passes(block_d):
        _dkdv_kernel[program_grid(n_k, kv_heads, batch, "BLOCK_N")](
            q, k, v, do, lse, delta, dk, dv,
            dq_accum,
            key_padding_mask, cu_seqlens_q, cu_seqlens_k,
            alibi_slopes,
            *input_strides,
            *kernel_strides(dk, varlen),
            *kernel_strides(dv, varlen),
            *kernel_strides(lse, varlen),
            *kernel_strides(dq_accum, varlen),
            kv_heads, heads // kv_heads, n_q, n_k,
            n_bucket(n_q), n_bucket(n_k),
            softmax_scale,
            scale_log2,
            **constexprs,
            FUSED_DQ=fused_dq and with_dk,
            WITH_DK=with_dk,
            WITH_DV=with_dv,
        )
    if fused_dq:
        if dq_tma:
            dq_accum = dq_accum[..., :rows_q].transpose(2, 3)
        return dq.copy_(dq_accum * softmax_scale), dk, dv
    if batch * n_q == 0:
        return dq, dk, dv

    _dq_kernel[program_grid(n_q, heads, batch, "BLOCK_M")](
        q, k, v, do, lse, delta, dq,
        key_padding_mask, key_bounds, cu_seqlens_q, cu_seqlens_k,
        alibi_slopes,
        *input_strides,
        *kernel_strides(dq, varlen),
        *kernel_strides(lse, varlen),
        heads, heads // kv_heads, n_q, n_k,
        n_bucket(n_q), n_bucket(n_k),
        softmax_scale,
        scale_log2,
        **constexprs,
    )
    return dq, dk, dv
