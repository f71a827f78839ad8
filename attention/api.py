"""The public functions: flash_attention, scaled_dot_product_attention and explain."""
import math

import torch
import torch.nn.functional as F

from .backends import Explanation, explain_choice, select_backend
from .validation import validate_inputs


def _check_causal(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def flash_attention(q, k, v, causal=False, softmax_scale=None, backend="auto", return_lse=False, *,
                    deterministic=True):
    """Fused attention softmax(scale · q kᵀ) v on (batch, heads, seq_len, head_dim) tensors.

    ``causal=True`` aligns the mask bottom-right: query i sees keys j <= i + Nk - Nq (what decoding
    with a KV cache needs). Rows that see no key give output 0 and lse -inf. ``softmax_scale``
    defaults to 1/sqrt(head_dim). ``backend`` is "auto", "triton", "cuda", "cpu" or "naive";
    ``explain`` tells which one a call takes and why. With ``return_lse`` also returns the float32
    log-sum-exp of the scaled scores, shape (batch, heads, Nq), without gradient.
    ``deterministic=False`` lets the Triton backward add dq with atomics in its dk/dv pass (fewer
    matmuls; dq's last bits vary between runs). With the default, gradients are bitwise repeatable for
    a given kernel config (the Triton autotuner picks one per process and may pick another elsewhere).
    """
    validate_inputs(q, k, v, softmax_scale)
    _check_causal("causal", causal)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    chosen = select_backend(q, k, v, backend)
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    o, lse = chosen.forward(q, k, v, causal, scale, deterministic)
    return (o, lse) if return_lse else o


def _torch_fallback_reasons(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    reasons = []
    if attn_mask is not None:
        reasons.append("attn_mask is given (our kernels take no arbitrary mask)")
    if dropout_p != 0.0:
        reasons.append(f"dropout_p={dropout_p} (our kernels have no dropout)")
    try:
        validate_inputs(query, key, value, scale)
    except (TypeError, ValueError) as exc:
        reasons.append(str(exc))
        return reasons
    if is_causal and query.shape[2] != key.shape[2]:
        reasons.append("is_causal with Nq != Nk: SDPA aligns the mask top-left, our kernels bottom-right")
    return reasons


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, same signature and meaning.

    Calls our fused kernels where they apply; otherwise (attn_mask, dropout, grouped heads, other
    ranks or dtypes, causal with Nq != Nk) torch's own SDPA runs the call. ``explain_sdpa`` says which.
    """
    if _torch_fallback_reasons(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
    return flash_attention(query, key, value, causal=bool(is_causal), softmax_scale=scale)


def explain(q, k, v, causal=False, softmax_scale=None, backend="auto") -> Explanation:
    """Which backend ``flash_attention`` with these arguments takes, and why the others were passed over."""
    validate_inputs(q, k, v, softmax_scale)
    _check_causal("causal", causal)
    return explain_choice(q, k, v, backend)


def explain_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What ``scaled_dot_product_attention`` does with these arguments: our backend, or torch's SDPA and why."""
    reasons = _torch_fallback_reasons(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    if reasons:
        return Explanation(None, torch_fallback=reasons)
    return explain_choice(query, key, value)
