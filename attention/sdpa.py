"""The drop-in for torch's scaled_dot_product_attention, and ``patch_torch_sdpa`` that routes torch's to it.

Our kernels run what they can do (key-padding masks, causal bottom-right, GQA, dropout); the rest goes
to torch's own SDPA, taken at import: once torch's name is patched to point here, our fallback must
never call that name, or it would call itself.
"""
import collections
import contextlib
import re

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, CausalVariant

from .api import _dense_options, autocast_inputs, run_backend
from .backends import Explanation, explain_choice
from .reference import causal_mask
from .validation import SDPA_NAMES, AttentionOptions, resolve_scale, validate_inputs

_torch_sdpa = F.scaled_dot_product_attention
_causal_bias_torch_function = CausalBias.__dict__["__torch_function__"]


@classmethod
def _causal_bias_torch_function_patched(cls, func, types, args=(), kwargs=None):
    """CausalBias.__torch_function__ while torch's name is patched: torch's only takes a CausalBias apart
    when the function called *is* the current ``F.scaled_dot_product_attention``, so a caller holding
    torch's original (``from torch.nn.functional import scaled_dot_product_attention`` before the patch)
    would run it on the bias as a raw tensor. Such calls go where the patched name goes."""
    if func is _torch_sdpa and F.scaled_dot_product_attention is not _torch_sdpa:
        return F.scaled_dot_product_attention(*args, **(kwargs or {}))
    return _causal_bias_torch_function.__get__(None, cls)(func, types, args, kwargs)


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


def _unwrap_causal_bias(attn_mask, is_causal):
    """torch's CausalBias as (attn_mask, is_causal, bottom_right), the arguments that mean the same.

    CausalBias only intercepts calls whose function *is* torch's own SDPA, so once that name is patched
    it would reach the math as a raw tensor of uninitialised memory: it is taken apart here instead.
    Lower-right is our causal; upper-left is SDPA's is_causal (the two agree when Nq == Nk)."""
    if not isinstance(attn_mask, CausalBias):
        return attn_mask, is_causal, False
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")  # torch's own message
    if attn_mask.variant == CausalVariant.UPPER_LEFT or attn_mask.seq_len_q == attn_mask.seq_len_kv:
        return None, True, False
    return None, True, True


def _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, bottom_right=False):
    """(reasons torch's SDPA must run the call, our key-padding mask or None, causal for our kernels)."""
    if any(isinstance(t, torch.Tensor) and t.is_nested for t in (query, key, value)):
        return ["nested (jagged) tensors: torch's SDPA takes them; for ours use flash_attention_varlen"], None, False
    reasons = []
    try:
        validate_inputs(query, key, value, names=SDPA_NAMES)
        resolve_scale(scale, None, query.shape[-1], "scale")
    except (TypeError, ValueError) as exc:
        return [str(exc)], None, False
    padding, causal = None, is_causal
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
    if is_causal and not bottom_right and query.shape[2] != key.shape[2]:
        reasons.append("is_causal with Nq != Nk: SDPA aligns the mask top-left, our kernels bottom-right")
    return reasons, padding, causal


def _check_is_causal(is_causal):
    if not isinstance(is_causal, bool):  # as torch's argument parser: 1 is not a bool
        raise TypeError(f"scaled_dot_product_attention(): argument 'is_causal' must be bool, not "
                        f"{type(is_causal).__name__}")


def _prepared_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """The call as our kernels would see it: (query, key, value, attn_mask, is_causal, bottom_right) after
    CausalBias and autocast, and _sdpa_plan's (reasons, padding, causal)."""
    _check_is_causal(is_causal)
    attn_mask, is_causal, bottom_right = _unwrap_causal_bias(attn_mask, is_causal)
    query, key, value = autocast_inputs(query, key, value)
    plan = _sdpa_plan(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, bottom_right)
    return (query, key, value, attn_mask, is_causal, bottom_right), plan


def sdpa_call(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """(output, the backend of ours that ran or None for torch's SDPA, the reasons torch's ran it)."""
    call, (reasons, padding, causal) = _prepared_plan(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa)
    query, key, value, attn_mask, is_causal, bottom_right = call
    if reasons:
        if bottom_right:  # torch's SDPA has no lower-right flag: the triangle as a mask
            attn_mask, is_causal = ~causal_mask(query.shape[-2], key.shape[-2], query.device), False
        output = _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                             scale=scale, enable_gqa=enable_gqa)
        return output, None, reasons
    options = _dense_options(query, key, value, causal, scale, None, padding, True, dropout_p=float(dropout_p))
    output, _, backend = run_backend(query, key, value, options, "auto")
    return output, backend, []


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """Drop-in for torch.nn.functional.scaled_dot_product_attention, same signature and meaning.

    Calls our fused kernels where they apply: grouped heads with ``enable_gqa=True``; dropout (our own
    mask, drawn from torch's default generator: the same distribution as torch's, not the same bits);
    torch's ``CausalBias`` (lower-right is our causal, upper-left SDPA's ``is_causal``); and a boolean
    ``attn_mask`` that is a key-padding mask (broadcastable to (B, 1, 1, Nk); or a (B, 1, Nq, Nk) mask
    equal to one, alone or with the bottom-right causal triangle, as Hugging Face models pass it:
    recognised outside torch.compile, at the cost of one comparison and a sync). Under autocast the
    inputs are cast as torch's SDPA casts them. Otherwise (other masks, nested tensors, other ranks or
    dtypes, is_causal with Nq != Nk) torch's own SDPA runs the call; ``explain_sdpa`` says which. A
    query row whose keys are all masked gives 0.
    """
    return sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)[0]


def explain_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """What ``scaled_dot_product_attention`` does with these arguments: our backend, or torch's SDPA and why."""
    call, (reasons, padding, causal) = _prepared_plan(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                                      enable_gqa)
    if reasons:
        return Explanation(None, torch_fallback=reasons)
    query, key, value = call[:3]
    scale = resolve_scale(scale, None, query.shape[-1], "scale")
    options = AttentionOptions(causal, scale, None if padding is None else padding.contiguous(),
                               dropout_p=float(dropout_p))
    return explain_choice(query, key, value, options)


class SdpaStats:
    """What the calls routed by ``patch_torch_sdpa`` ran on: ``calls`` per backend ("cpu", "triton", ...,
    "torch" for a fallback) and ``fallbacks`` per reason (shapes elided, so like calls count together)."""

    def __init__(self):
        self.calls = collections.Counter()
        self.fallbacks = collections.Counter()

    def record(self, backend, reasons):
        self.calls[backend or "torch"] += 1
        for reason in reasons:
            self.fallbacks[re.sub(r"\(\d[\d, ]*\)", "(...)", reason)] += 1

    @property
    def ours(self):
        """The share of calls that ran on our kernels."""
        total = sum(self.calls.values())
        return (total - self.calls["torch"]) / total if total else 0.0

    def __repr__(self):
        return f"SdpaStats(calls={dict(self.calls)}, fallbacks={dict(self.fallbacks)})"


class patch_torch_sdpa(contextlib.ContextDecorator):
    """Routes ``torch.nn.functional.scaled_dot_product_attention`` to ours while active, then restores
    whatever was there (so patches nest). A context manager giving its ``SdpaStats``, or a decorator:

        with attention.patch_torch_sdpa() as stats:
            model(tokens)   # every F.scaled_dot_product_attention call inside runs ours or torch's
        print(stats.calls, stats.fallbacks)
    """

    def __init__(self):
        self.stats = SdpaStats()
        self._saved = []

    def _routed(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                enable_gqa=False):
        output, backend, reasons = sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        self.stats.record(backend, reasons)
        return output

    def __enter__(self):
        # torch.overrides caches the overridable functions by their names' values on first use, and
        # torch.compile asks it whether to dispatch __torch_function__ (CausalBias's) on a call: filled
        # while patched, it would lack torch's SDPA for the rest of the process. Fill it first.
        torch.overrides.get_overridable_functions()
        self._saved.append((F.scaled_dot_product_attention, CausalBias.__dict__["__torch_function__"]))
        F.scaled_dot_product_attention = self._routed
        CausalBias.__torch_function__ = _causal_bias_torch_function_patched
        return self.stats

    def __exit__(self, *exc):
        F.scaled_dot_product_attention, CausalBias.__torch_function__ = self._saved.pop()
        return False
