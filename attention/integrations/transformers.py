"""Our kernels as a Hugging Face transformers ``attn_implementation`` (needs ``fused-attention[transformers]``).

    from attention.integrations import transformers as fused_hf
    fused_hf.register()  # "fused_attention"
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="fused_attention")

``register`` installs two functions, and both are needed: an attention function alone receives
``attention_mask=None`` from every model (transformers builds masks only for implementations that have a
mask function), so padding would be ignored without an error.

- The mask function (``AttentionMaskInterface``) checks the pattern transformers asks for against what our
  kernels express: bidirectional, causal, or causal with a sliding window, positions aligned by the cache's
  offsets, plus key padding. It returns the key-padding mask as transformers' own 2-D ``attention_mask``
  (absolute positions, so that a mask made once by ``generate`` can be passed back into the model) with a
  ``MaskPlan`` attached that says how the attention function runs it.
- The attention function (``AttentionInterface``) runs each layer as ``attention.flash_attention`` does: key
  padding as ``key_padding_mask``, causal aligned bottom-right (decode steps, dynamic and static caches),
  grouped-query heads without repeating k and v, sliding windows as ``window=(sliding_window - 1, 0)``
  (transformers' window of W covers the query's own key and W - 1 before it), ``softcap`` (Gemma-2), the
  model's ``dropout`` (models pass 0 outside training). What our kernels cannot run — an additive
  ``position_bias`` (T5's relative attention bias), a mask pattern other than the above (packed sequences,
  chunked attention, custom overlays), a mask made elsewhere, inputs no backend takes — runs on
  transformers' SDPA path (eager math where a softcap rules SDPA out) with the mask SDPA would have got.
  ``stats`` counts every call by the backend that ran it and every fallback by its reason.
- Decode steps (at most DECODE_MAX_QUERIES new rows, no key padding, no dropout, no gradient) run on the
  backend's KV-cache kernel instead (``("decode", backend)`` in ``stats``): it splits the cache's keys across
  programs and reads each key once for all query heads of its KV head, where the dense kernel gives a
  single query row one program per head.

Not made for torch.compile: a plan is read from tensor values (padding, a static cache's offset).
"""
import collections
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    bidirectional_mask_function,
    causal_mask_function,
    prepare_padding_mask,
    sdpa_mask,
)

from ..api import _dense_options, autocast_inputs
from ..backends import BACKENDS, select_backend
from ..kvcache import run_decode

PLAN_ATTRIBUTE = "fused_attention_plan"
TORCH_SDPA, TORCH_EAGER = "torch_sdpa", "torch_eager"

POSITION_BIAS = "position_bias: an additive score bias (T5's relative attention bias)"
FOREIGN_MASK = ("an attention_mask tensor the fused_attention mask function did not make (a precomputed 4-D mask, "
                "or a model that builds its own)")
PAGED_CACHE = "a paged cache (continuous batching)"
OTHER_PATTERN = ("a mask pattern other than bidirectional, causal or causal sliding-window (packed sequences, chunked "
                 "attention, custom mask functions)")
TRACED = "the mask was made while tracing (torch.compile or export), where its values cannot be read"
CAUSAL_MORE_QUERIES = "is_causal with more queries than keys"
CAUSAL_OFFSETS = "a causal mask whose queries are not at the end of its keys' positions"
WRONG_KEY_COUNT = "the layer's keys are not the ones the mask was made for"
# The most new query rows a call may have to run as a decode step: one token, or speculative decoding's few.
DECODE_MAX_QUERIES = 16


class AttentionStats(collections.Counter):
    """Calls of the registered attention function: ``("backend", name)`` per call, name the backend that ran it
    (ours: "triton", "cuda", "cpu", "naive"; transformers' fallbacks: "torch_sdpa", "torch_eager"), and
    ``("fallback", reason)`` per call that could not run on ours."""

    def reset(self):
        self.clear()

    def calls(self, ours=None):
        """Calls counted, all of them or (ours True/False) those on our backends / on the fallbacks."""
        return sum(n for (kind, name), n in self.items()
                   if kind == "backend" and (ours is None or (name in BACKENDS) == ours))

    def share_on_ours(self):
        """The fraction of calls our backends ran (0.0 with no call)."""
        total = self.calls()
        return self.calls(ours=True) / total if total else 0.0

    def fallbacks(self):
        """{reason: calls} of the fallbacks."""
        return {reason: n for (kind, reason), n in self.items() if kind == "fallback"}


stats = AttentionStats()


@dataclass(frozen=True)
class MaskPlan:
    """How one mask's layers run. Key j of such a layer is at absolute position kv_offset + j and query i at
    the cache's query offset + i; the 2-D mask carrying the plan is True at the absolute positions of real keys."""

    kv_length: int  # the keys each layer gets
    kv_offset: int
    kv_used: int  # keys [0, kv_used) can be visible; the rest are later positions (empty static-cache slots)
    causal: bool
    window_left: int  # -1: unbounded
    has_padding: bool
    fallback_reason: str | None
    dense: Callable[[], torch.Tensor]  # the boolean (B, 1, Nq, kv_length) mask transformers gives SDPA

    def key_padding_mask(self, carrier):
        """Our (B, kv_used) key-padding mask, or None when every key is real."""
        return carrier[:, self.kv_offset:self.kv_offset + self.kv_used] if self.has_padding else None


def _tracing():
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


def _visible(q_positions, k_positions, causal, window_left):
    """(Nq, Nk) bool: which keys the (causal, window_left) pattern shows each query, by absolute position."""
    q, k = q_positions[:, None], k_positions[None, :]
    visible = k <= q if causal else torch.ones_like(q == k)
    return visible & (k >= q - window_left) if window_left >= 0 else visible


def _pattern(mask_function, local_size, batch_size, q_length, kv_length, q_offset, kv_offset, use_vmap, device):
    """(causal, window_left) of transformers' mask function, or None when our kernels cannot express it.
    A function other than the two plain ones is drawn once (as SDPA's mask would be) and compared."""
    if mask_function is causal_mask_function:
        return True, -1
    if mask_function is bidirectional_mask_function:
        return False, -1
    drawn = sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                      kv_offset=kv_offset, mask_function=mask_function, allow_is_causal_skip=False, use_vmap=use_vmap,
                      device=device)
    q_positions = torch.arange(q_length, device=device) + q_offset
    k_positions = torch.arange(kv_length, device=device) + kv_offset
    # local_size is the sliding window when transformers makes a sliding-window mask
    candidates = ([(True, local_size - 1)] if local_size else []) + [(True, -1), (False, -1)]
    for causal, window_left in candidates:
        if torch.equal(drawn, _visible(q_positions, k_positions, causal, window_left).expand_as(drawn)):
            return causal, window_left
    return None


def fused_attention_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=causal_mask_function,
                         attention_mask=None, local_size=None, use_vmap=False, device="cpu", **kwargs):
    """The ``AttentionMaskInterface`` function: the 2-D key-padding mask (B, kv_offset + kv_length), True at
    real keys, with the ``MaskPlan`` as its attribute ``fused_attention_plan``."""
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
    if padding is None:
        padding = torch.ones(batch_size, kv_offset + kv_length, dtype=torch.bool, device=device)
    padding = padding.expand(batch_size, -1)  # a mask of batch 1 serves every row
    dense = functools.partial(sdpa_mask, batch_size=batch_size, q_length=q_length, kv_length=kv_length,
                              q_offset=q_offset, kv_offset=kv_offset, mask_function=mask_function,
                              attention_mask=attention_mask, allow_is_causal_skip=False, use_vmap=use_vmap,
                              device=device)
    plan = dict(kv_length=kv_length, kv_offset=kv_offset, kv_used=kv_length, causal=False, window_left=-1,
                has_padding=True, fallback_reason=None, dense=dense)
    pattern = None
    if _tracing():
        plan["fallback_reason"] = TRACED
    else:
        pattern = _pattern(mask_function, local_size, batch_size, q_length, kv_length, q_offset, kv_offset, use_vmap,
                           device)
        if pattern is None:
            plan["fallback_reason"] = OTHER_PATTERN
    if pattern is not None:
        causal, window_left = pattern
        # Our causal is bottom-right: the last query sees the last key. Keys after the last query's position
        # (a static cache's empty slots) are cut off, which aligns query i at key i + q_offset - kv_offset.
        kv_used = int(q_offset) - kv_offset + q_length if causal else kv_length
        if causal and not q_length <= kv_used <= kv_length:
            plan["fallback_reason"] = CAUSAL_OFFSETS
        else:
            has_padding = not bool(padding[:, kv_offset:kv_offset + kv_used].all())
            plan.update(kv_used=kv_used, causal=causal, window_left=window_left, has_padding=has_padding)
    # A new tensor object for each plan (the masks of several layer types may share one 2-D input), contiguous
    # so that generate's .contiguous() keeps the object and its plan.
    carrier = padding.contiguous().view(padding.shape)
    setattr(carrier, PLAN_ATTRIBUTE, MaskPlan(**plan))
    return carrier


def _is_zero(bias):
    """A bias of zeros that needs no gradient (T5's layers without relative attention bias) changes nothing."""
    return not bias.requires_grad and not _tracing() and not bool(bias.any())


def _eager_attention(query, key, value, mask, dropout, scaling, softcap, position_bias):
    """Eager math with a softcap, which transformers' SDPA path refuses: the fallback of softcapped models."""
    groups = query.shape[1] // key.shape[1]
    key, value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    scores = torch.matmul(query, key.transpose(2, 3)) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    scores = softcap * torch.tanh(scores / softcap)
    if position_bias is not None:
        scores = scores + position_bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    # a row with every key masked gives 0, as in our kernels and torch's SDPA
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0).to(query.dtype)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=dropout > 0)
    return torch.matmul(probs, value).transpose(1, 2).contiguous()


def _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, softcap, position_bias,
              kwargs):
    stats[("fallback", reason)] += 1
    plan = getattr(attention_mask, PLAN_ATTRIBUTE, None)
    mask = plan.dense() if plan is not None else attention_mask
    if not softcap:
        stats[("backend", TORCH_SDPA)] += 1
        return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, position_bias=position_bias, **kwargs)
    stats[("backend", TORCH_EAGER)] += 1
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if mask is None and causal and query.shape[2] > 1:  # SDPA's is_causal: aligned top-left
        mask = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
    return _eager_attention(query, key, value, mask, dropout, scaling, softcap, position_bias), None


def fused_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                            softcap=None, position_bias=None, *, backend="auto", **kwargs):
    """The ``AttentionInterface`` function: q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) in, (B, Nq, Hq, D) out.
    ``sliding_window`` in kwargs is not read: the mask's plan has the window transformers masks with."""
    plan = getattr(attention_mask, PLAN_ATTRIBUTE, None)
    fallback = functools.partial(_fallback, module=module, query=query, key=key, value=value,
                                 attention_mask=attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
                                 softcap=softcap, position_bias=position_bias, kwargs=kwargs)
    if position_bias is not None and not _is_zero(position_bias):
        return fallback(POSITION_BIAS)
    if kwargs.get("cache") is not None:
        return fallback(PAGED_CACHE)
    n_q = query.shape[2]
    key_padding_mask, window_left = None, -1
    if plan is not None:
        if plan.fallback_reason is not None:
            return fallback(plan.fallback_reason)
        if key.shape[2] != plan.kv_length:
            return fallback(WRONG_KEY_COUNT)
        key, value = key[:, :, :plan.kv_used], value[:, :, :plan.kv_used]
        causal, window_left, key_padding_mask = plan.causal, plan.window_left, plan.key_padding_mask(attention_mask)
    elif attention_mask is not None:
        return fallback(FOREIGN_MASK)
    else:  # no mask: SDPA's is_causal, which is aligned top-left and off for a single query
        causal = n_q > 1 and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        if causal and n_q > key.shape[2]:
            return fallback(CAUSAL_MORE_QUERIES)
        if causal:  # top-left: keys after the last query's index are never seen
            key, value = key[:, :, :n_q], value[:, :, :n_q]
    query, key, value = autocast_inputs(query, key, value)
    try:  # validated and dispatched once, as flash_attention does, but a refusal falls back instead of raising
        options = _dense_options(query, key, value, causal, scaling, None, key_padding_mask, True,
                                 window=(window_left, -1), softcap=float(softcap or 0.0),
                                 dropout_p=float(dropout or 0.0))
        chosen = select_backend(query, key, value, options, backend)
    except (TypeError, ValueError) as exc:
        return fallback(f"inputs our kernels do not take: {exc}")
    except RuntimeError:
        return fallback(f"no backend of ours can run the call (backend={backend!r})")
    stats[("backend", chosen.name)] += 1
    if _is_decode_step(chosen, query, key, value, options):
        stats[("decode", chosen.name)] += 1
        lengths = torch.full((key.shape[0],), key.shape[2], dtype=torch.int32, device=key.device)
        out, _ = run_decode(chosen, query, key, value, lengths, None, options)
    else:
        out, _ = chosen.forward(query, key, value, options)
    return out.transpose(1, 2).contiguous(), None


def _is_decode_step(backend, query, key, value, options):
    """Whether the call is a decode step the backend's KV-cache kernel runs exactly (see the module doc)."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return (backend.decode is not None and query.shape[2] <= DECODE_MAX_QUERIES and options.key_padding_mask is None
            and options.dropout_p == 0 and not needs_grad and key.stride(-1) == 1 and value.stride(-1) == 1
            and key.shape[2] > 0)


def register(name="fused_attention", backend="auto"):
    """Make ``attn_implementation=name`` run on our kernels: registers the attention function and its mask
    function with transformers. ``backend`` is flash_attention's ("auto", "triton", "cuda", "cpu", "naive").
    Returns ``name``."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    AttentionInterface.register(name, functools.partial(fused_attention_forward, backend=backend))
    AttentionMaskInterface.register(name, fused_attention_mask)
    return name
