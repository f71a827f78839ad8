"""The public functions: flash_attention, flash_attention_varlen, explain."""
import torch

from .backends import Explanation, explain_choice, select_backend
from .validation import (
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

def autocast_inputs(*tensors):
    """q, k, v as torch's SDPA sees them under autocast: cast to the autocast dtype (float64 left alone)."""
    device_type = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else None
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def run_backend(q, k, v, options, backend):
    """(o, lse, the name of the backend that ran)."""
    chosen = select_backend(q, k, v, options, backend)
    o, lse = chosen.forward(q, k, v, options)
    return o, lse, chosen.name


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
    matmuls; dq's last bits vary between runs) at head dims up to 128; above, it runs the deterministic
    kernels (a fused pass there spills registers). With the default, gradients are bitwise repeatable for
    a given kernel config (the Triton autotuner picks one per process and may pick another elsewhere).
    """
    q, k, v = autocast_inputs(q, k, v)
    options = _dense_options(q, k, v, causal, softmax_scale, scale, key_padding_mask, deterministic, window, softcap,
                             alibi_slopes, dropout_p, dropout_seed)
    o, lse, _ = run_backend(q, k, v, options, backend)
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
    q, k, v = autocast_inputs(q, k, v)
    validate_inputs(q, k, v, rank=3)
    validate_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k)
    shared = _score_options(causal, deterministic, window, softcap, alibi_slopes, dropout_p, dropout_seed,
                            cu_seqlens_q.numel() - 1, q)
    options = AttentionOptions(softmax_scale=resolve_scale(softmax_scale, scale, q.shape[-1]),
                               cu_seqlens_q=cu_seqlens_q.contiguous(), cu_seqlens_k=cu_seqlens_k.contiguous(),
                               max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, **shared)
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, total, D) views, no copy
    o, lse, _ = run_backend(q4, k4, v4, options, backend)
    o = o[0].transpose(0, 1)
    return (o, lse[0]) if return_lse else o


def explain(q, k, v, causal=False, softmax_scale=None, backend="auto", *, key_padding_mask=None, window=(-1, -1),
            softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_seed=None, deterministic=True,
            scale=None) -> Explanation:
    """Which backend ``flash_attention`` with these arguments takes, and why the others were passed over."""
    q, k, v = autocast_inputs(q, k, v)
    options = _dense_options(q, k, v, causal, softmax_scale, scale, key_padding_mask, deterministic, window, softcap,
                             alibi_slopes, dropout_p, 0 if dropout_seed is None else dropout_seed)
    return explain_choice(q, k, v, options, backend)
