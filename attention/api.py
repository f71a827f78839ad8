"""The public functions: flash_attention, flash_attention_varlen, scaled_dot_product_attention, explain."""
import torch
import torch.nn.functional as F

from .backends import Explanation, explain_choice, select_backend
from .reference import causal_mask
from .validation import (
    SDPA_NAMES,
    AttentionOptions,
    check_bool,
    resolve_scale,
    validate_alibi_slopes,
    validate_cu_seqlens,
    validate_dropout,
    validate_inputs,
    validate_key_padding_mask,
    validate_softcap,
    validate_window,
)

# torch's own SDPA, taken at import: a user (or Hugging Face integration) may replace
# F.scaled_dot_product_attention with ours, and our fallback must not then call itself.
_torch_sdpa = F.scaled_dot_product_attention


def _score_options(causal, deterministic, window, softcap, alibi_slopes, dropout_p, dropout_seed, batch, q):
    """The AttentionOptions fields every call shares; `batch` counts sequences (varlen) or batch elements."""
    check_bool("causal", causal)
    check_bool("deterministic", deterministic)
    window_left, window_right = validate_window(window)
    dropout_p, dropout_seed, dropout_offset = validate_dropout(dropout_p, dropout_seed)
    return dict(causal=causal, deterministic=deterministic, window_left=window_left, window_right=window_right,
                softcap=validate_softcap(softcap),
                alibi_slopes=validate_alibi_slopes(alibi_slopes, batch, q.shape[1], q.device),
                dropout_p=dropout_p, dropout_seed=dropout_seed, dropout_offset=dropout_offset)


def _dense_options(q, k, v, causal, softmax_scale, scale, key_padding_mask, deterministic, window=(-1, -1),
                   softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
    validate_inputs(q, k, v)
    shared = _score_options(causal, deterministic, window, softcap, alibi_slopes, dropout_p, dropout_seed,
                            q.shape[0], q)
    if key_padding_mask is not None:
        key_padding_mask = validate_key_padding_mask(key_padding_mask, q, k)
    return AttentionOptions(softmax_scale=resolve_scale(softmax_scale, scale, q.shape[-1]),
                            key_padding_mask=key_padding_mask, **shared)


SCORE_OPTIONS_DOC = """
    Score modifiers (keyword-only; positions bottom-right: shift = Nk - Nq, query i, key j):
    ``window=(left, right)``: i sees j iff i + shift - left <= j <= i + shift + right, -1 leaving a side
    unbounded (``causal`` is right = 0); key tiles outside every query's window are skipped, so a fixed
    window costs O(N · window). ``softcap`` > 0: s = softcap · tanh(s / softcap) (Gemma-2).
    ``alibi_slopes``: float32 (Hq,) or (B, Hq), s -= slope · |i + shift - j| after the softcap.
    ``dropout_p``: probabilities times a keep-mask / (1 - dropout_p), lse unaffected; the mask is
    ``attention.dropout_mask(dropout_p, dropout_seed, 0, ...)`` when ``dropout_seed`` is given, else
    seed and offset come from torch's default generator (``torch.manual_seed`` reproduces a run; under
    torch.compile give a seed, the draw would break the graph). Every backend draws the same mask.
"""


def flash_attention(q, k, v, causal=False, softmax_scale=None, backend="auto", return_lse=False, *,
                    key_padding_mask=None, window=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                    dropout_seed=None, deterministic=True, scale=None):
    """Fused attention softmax(scale · q kᵀ) v on (batch, heads, seq_len, head_dim) tensors.

    q is (B, Hq, Nq, D); k and v are (B, Hkv, Nk, D) with Hq a multiple of Hkv: grouped-query (and,
    with Hkv = 1, multi-query) attention, query head h reading KV head h // (Hq // Hkv), as SDPA's
    ``enable_gqa``; k and v are never expanded. ``causal=True`` aligns the mask bottom-right: query i
    sees keys j <= i + Nk - Nq (what decoding with a KV cache needs). ``key_padding_mask``: bool
    (B, Nk), True where the key is real (left or right padding, or holes); it combines with
    ``causal``. Rows that see no key give output 0 and lse -inf. ``softmax_scale`` (or its alias
    ``scale``, SDPA's name) defaults to 1/sqrt(head_dim). ``backend`` is "auto", "triton", "cuda",
    "cpu" or "naive"; ``explain`` tells which one a call takes and why. With ``return_lse`` also
    returns the float32 log-sum-exp of the scaled scores, shape (B, Hq, Nq), without gradient.
    ``deterministic=False`` lets the Triton backward add dq with atomics in its dk/dv pass (fewer
    matmuls; dq's last bits vary between runs). With the default, gradients are bitwise repeatable for
    a given kernel config (the Triton autotuner picks one per process and may pick another elsewhere).
    """
    options = _dense_options(q, k, v, causal, softmax_scale, scale, key_padding_mask, deterministic, window, softcap,
                             alibi_slopes, dropout_p, dropout_seed)
    o, lse = select_backend(q, k, v, options, backend).forward(q, k, v, options)
    return (o, lse) if return_lse else o


flash_attention.__doc__ += SCORE_OPTIONS_DOC


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                           softmax_scale=None, backend="auto", return_lse=False, *, window=(-1, -1), softcap=0.0,
                           alibi_slopes=None, dropout_p=0.0, dropout_seed=None, deterministic=True, scale=None):
    """``flash_attention`` on packed variable-length batches, flash-attn's layout, with no padding.

    q is (total_q, Hq, D), k and v (total_k, Hkv, D): the sequences of a batch one after another.
    cu_seqlens_q and cu_seqlens_k are int32 (B + 1,) offsets on q's device (from 0, non-decreasing,
    ending at total): sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]; lengths may be 0 and differ
    between q and k. max_seqlen_q / max_seqlen_k bound the lengths (they size the kernels' grids).
    Causal is bottom-right within each sequence. Returns o (total_q, Hq, D) and, with ``return_lse``,
    lse float32 (Hq, total_q). The offsets are checked on the host (one small copy) outside torch.compile.
    The score modifiers are ``flash_attention``'s, positions counted within each sequence (alibi_slopes
    (B, Hq) and the dropout mask indexed by sequence).
    """
    validate_inputs(q, k, v, rank=3)
    validate_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k)
    shared = _score_options(causal, deterministic, window, softcap, alibi_slopes, dropout_p, dropout_seed,
                            cu_seqlens_q.numel() - 1, q)
    options = AttentionOptions(softmax_scale=resolve_scale(softmax_scale, scale, q.shape[-1]),
                               cu_seqlens_q=cu_seqlens_q.contiguous(), cu_seqlens_k=cu_seqlens_k.contiguous(),
                               max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **shared)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, total, D) views, no copy
    o, lse = select_backend(q4, k4, v4, options, backend).forward(q4, k4, v4, options)
    o = o[0].transpose(0, 1)
    return (o, lse[0]) if return_lse else o


def _mask_as_padding(attn_mask, query, key):
    """SDPA's boolean ``attn_mask`` (True: take part) as (our (B, Nk) key-padding mask, causal), or None.

    A mask broadcastable to (B, 1, 1, Nk) is one as it stands. A (B or 1, 1, Nq, Nk) mask, the form
    Hugging Face models pass for padded batches, is one when it equals its last row's keys, alone or
    with the bottom-right causal triangle (what a causal model with a KV cache masks); that costs a
    comparison of the mask and a device-to-host sync, so it is done outside torch.compile only.
    """
    if attn_mask.dtype != torch.bool or attn_mask.dim() > 4 or attn_mask.dim() == 0:
        return None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    batch, n_q, n_k = query.shape[0], query.shape[2], key.shape[2]
    if mask.shape[1] != 1 or mask.shape[0] not in (1, batch) or mask.shape[3] not in (1, n_k):
        return None
    if mask.shape[2] == 1:
        return mask[:, 0, 0, :].expand(batch, n_k), False
    if mask.shape[2] != n_q or mask.shape[3] != n_k or n_q == 0 or torch.compiler.is_compiling():
        return None
    rows, last_row = mask[:, 0], mask[:, 0, -1:, :]  # under bottom-right causal the last row sees every key
    if torch.equal(rows, last_row.expand_as(rows)):
        return last_row[:, 0].expand(batch, n_k), False
    if torch.equal(rows, last_row & ~causal_mask(n_q, n_k, mask.device)):
        return last_row[:, 0].expand(batch, n_k), True
    return None


def _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """(reasons torch's SDPA must run the call, our key-padding mask or None, causal for our kernels)."""
    reasons = []
    try:
        validate_inputs(query, key, value, names=SDPA_NAMES)
        resolve_scale(scale, None, query.shape[-1], "scale")
    except (TypeError, ValueError) as exc:
        return [str(exc)], None, False
    padding, causal = None, bool(is_causal)
    if attn_mask is not None:
        as_padding = None
        if not isinstance(attn_mask, torch.Tensor):
            reasons.append(f"attn_mask is a {type(attn_mask).__name__}, not a tensor")
        elif is_causal:
            reasons.append("attn_mask and is_causal are both given (torch's SDPA rejects that)")
        elif attn_mask.device != query.device:
            reasons.append(f"attn_mask is on {attn_mask.device} but query is on {query.device}")
        else:
            as_padding = _mask_as_padding(attn_mask, query, key)
            if as_padding is None:
                reasons.append(f"attn_mask ({attn_mask.dtype}, shape {tuple(attn_mask.shape)}) is not a boolean "
                               f"key-padding mask (broadcastable to (batch, 1, 1, Nk), or (batch, 1, Nq, Nk) equal "
                               f"to one, with or without the causal triangle), the only mask our kernels take")
            else:
                padding, causal = as_padding
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        reasons.append(f"dropout_p={dropout_p!r} is not a float in [0, 1)")
    if key.shape[1] != query.shape[1] and not enable_gqa:
        reasons.append(f"key has {key.shape[1]} heads and query {query.shape[1]}, but enable_gqa is False")
    if is_causal and query.shape[2] != key.shape[2]:
        reasons.append("is_causal with Nq != Nk: SDPA aligns the mask top-left, our kernels bottom-right")
    return reasons, padding, causal


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, same signature and meaning.

    Calls our fused kernels where they apply, dropout included (our own mask, drawn from torch's default
    generator: the same distribution as torch's, not the same bits): grouped heads with ``enable_gqa=True`` and a boolean
    ``attn_mask`` that is a key-padding mask included (broadcastable to (B, 1, 1, Nk); or a (B, 1, Nq, Nk)
    mask equal to one, alone or with the bottom-right causal triangle, as Hugging Face models pass
    it: recognised outside torch.compile, at the cost of one comparison and a sync). Otherwise
    (other masks, other ranks or dtypes, causal with Nq != Nk) torch's own SDPA runs the call;
    ``explain_sdpa`` says which. A query row whose keys are all masked gives 0.
    """
    reasons, padding, causal = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reasons:
        return _torch_sdpa(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    return flash_attention(query, key, value, causal=causal, softmax_scale=scale, key_padding_mask=padding,
                           dropout_p=float(dropout_p))


def explain(q, k, v, causal=False, softmax_scale=None, backend="auto", *, key_padding_mask=None, window=(-1, -1),
            softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None, deterministic=True,
            scale=None) -> Explanation:
    """Which backend ``flash_attention`` with these arguments takes, and why the others were passed over."""
    options = _dense_options(q, k, v, causal, softmax_scale, scale, key_padding_mask, deterministic, window, softcap,
                             alibi_slopes, dropout_p, 0 if dropout_seed is None else dropout_seed)
    return explain_choice(q, k, v, options, backend)


def explain_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What ``scaled_dot_product_attention`` does with these arguments: our backend, or torch's SDPA and why."""
    reasons, padding, causal = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reasons:
        return Explanation(None, torch_fallback=reasons)
    scale = resolve_scale(scale, None, query.shape[-1], "scale")
    options = AttentionOptions(causal, scale, None if padding is None else padding.contiguous(),
                               dropout_p=float(dropout_p))
    return explain_choice(query, key, value, options)
