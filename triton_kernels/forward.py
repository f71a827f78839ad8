"""Flash-attention forward in Triton: one program per (batch, head, query tile), online softmax over key tiles."""
import torch
import triton
import triton.language as tl

from .common import (
    LN2,
    LOG2E,
    KernelConfigs,
    dot_precision,
    key_range,
    load_rows,
    n_bucket,
    padded_head_dim,
    program_grid,
    program_tile,
    store_rows,
    visible,
)


def _forward_shared_memory(config, block_d, element_bytes):
    """K and V tiles for every pipeline stage plus the Q tile."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    tiles = 2 * config.num_stages * block_n * block_d + block_m * block_d
    return tiles * element_bytes


# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim; see KernelConfigs for what they are held to.
CONFIGS = KernelConfigs(
    tensor_core={
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3)],
        128: [(128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)],
        256: [(64, 32, 8, 2), (64, 64, 8, 2)],
    },
    fp32=[(32, 32, 4, 2), (32, 16, 8, 2), (16, 16, 4, 2)],
    shared_memory=_forward_shared_memory,
    interpreter_shape=(32, 16, 4, 1),
)


@triton.autotune(
    configs=CONFIGS.all(),
    # The lengths only as buckets (n_bucket): retuning and recompiling for every new length would stall
    # training on variable-length batches. The autotuner adds the tensors' dtypes to the key itself.
    key=["BLOCK_D", "CAUSAL", "q_bucket", "k_bucket"],
    prune_configs_by={"early_config_prune": CONFIGS.prune},
)
@triton.jit
def _forward_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    n_heads, n_q, n_k,
    q_bucket, k_bucket,  # autotune key only
    scale_log2,  # softmax scale times log2(e): scores come out in base 2, ready for exp2
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m, batch, head = program_tile(n_q, n_heads, BLOCK_M)
    q_base = Q + batch * stride_qb + head * stride_qh
    k_base = K + batch * stride_kb + head * stride_kh
    v_base = V + batch * stride_vb + head * stride_vh

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_rows(q_base, offs_m, stride_qn, n_q, offs_d, HEAD_DIM)
    if scale_log2 < 0:
        # The unmasked loop takes row maxima of the unscaled scores, right only for a scale >= 0. A negative
        # scale (allowed, if unusual) is folded into q, once per program: negation is exact in every dtype.
        q = -q
        scale_log2 = -scale_log2

    # Running row max (base-2 units), row sum of exp2(score - max), and the unnormalized output.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    unmasked_end, visible_end = key_range(start_m, n_q, n_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attend_key_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k, scale_log2,
        0, unmasked_end, False, CAUSAL, HEAD_DIM, DOT_PRECISION, BLOCK_N,
    )
    acc, l_i, m_i = _attend_key_tiles(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k, scale_log2,
        unmasked_end, visible_end, True, CAUSAL, HEAD_DIM, DOT_PRECISION, BLOCK_N,
    )

    # l_i is 0 exactly for rows that saw no key (any visible key adds exp2(0) = 1): output 0, lse -inf.
    no_key = l_i == 0.0
    l_safe = tl.where(no_key, 1.0, l_i)
    o = acc / l_safe[:, None]
    lse = tl.where(no_key, float("-inf"), (m_i + tl.math.log2(l_safe)) * LN2)

    o_base = O + batch * stride_ob + head * stride_oh
    store_rows(o_base, o.to(O.dtype.element_ty), offs_m, stride_on, n_q, offs_d, HEAD_DIM)
    lse_base = LSE + (batch * n_heads + head) * n_q
    tl.store(lse_base + offs_m, lse, mask=offs_m < n_q)


@triton.jit
def _attend_key_tiles(
    acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, offs_m, offs_d, n_q, n_k, scale_log2,
    start, end,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Fold key tiles [start, end) into the online softmax state; mask scores only when MASKED."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_rows(k_base, offs_n, stride_kn, n_k, offs_d, HEAD_DIM)
        v = load_rows(v_base, offs_n, stride_vn, n_k, offs_d, HEAD_DIM)

        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        if MASKED:
            s = tl.where(visible(offs_m[:, None], offs_n[None, :], n_q, n_k, CAUSAL), qk * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # A row with no visible key so far has m_new = -inf, and -inf - -inf is NaN: subtract 0 instead,
            # so its p and alpha come out exp2(-inf) = 0.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_shift[:, None])
        else:
            # Every key visible, so m_new is finite; scaling and subtracting the max is one FMA per score
            # (scale_log2 >= 0: the max of the unscaled scores gives the max of the scaled ones).
            m_new = tl.maximum(m_i, tl.max(qk, 1) * scale_log2)
            m_shift = m_new
            p = tl.math.exp2(qk * scale_log2 - m_shift[:, None])
        alpha = tl.math.exp2(m_i - m_shift)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def attention_forward(q, k, v, causal: bool, softmax_scale: float):
    """Fused attention forward on (B, H, N, D) tensors, validated by the caller.

    q, k, v share device and dtype (fp16, bf16 or fp32), B, H and D (<= 256); k and v share Nk; any strides
    with a contiguous last dim. Causal is bottom-right aligned.
    Returns o: new contiguous (B, H, Nq, D) in q.dtype, and lse: new contiguous float32 (B, H, Nq), the
    natural log of sum_j exp(scale * q.k_j); -inf (and o = 0) for rows that see no key.
    """
    batch, heads, n_q, head_dim = q.shape
    n_k = k.shape[2]
    o = torch.empty((batch, heads, n_q, head_dim), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, n_q), device=q.device, dtype=torch.float32)

    _forward_kernel[program_grid(n_q, heads, batch, "BLOCK_M")](
        q, k, v, o, lse,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        heads, n_q, n_k,
        n_bucket(n_q), n_bucket(n_k),
        softmax_scale * LOG2E.value,
        HEAD_DIM=head_dim,
        BLOCK_D=padded_head_dim(head_dim),
        CAUSAL=causal,
        DOT_PRECISION=dot_precision(q.dtype),
    )
    return o, lse
