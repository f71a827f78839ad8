"""The attention implementations a benchmark compares, each with a "why not" check.

A provider is a forward function ``(q, k, v, causal, **extra) -> o`` on the inputs of one case in
one form (cases.py: (B, H, N, D) tensors with Nq == Nk, so SDPA's top-left causal mask and our
bottom-right one agree; or packed sequences; ``extra`` holds masks, offsets and score options), plus ``why_not``,
which names the reason it cannot run a (device, dtype, head_dim, causal, mode) family of its case,
or returns None. Every mode's timed step (forward, backward, both) is built from the forward the same
way for all providers. Each case has its own list of providers (``case_providers``).
"""
import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention

from .cases import CASES, DTYPE_NAMES, OPTIONS, case_inputs, probe_config

OUR_BACKENDS = ("triton", "cuda", "cpu")


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    forward: Callable  # (q, k, v, causal, **extra) -> o
    why_not: Callable  # (device, dtype, head_dim, causal, mode) -> str | None
    form: str = "dense"  # the form of its case's inputs it takes (cases.FORMS)
    family: str = ""  # the main grid's provider it is a variant of ("sdpa-flash" for "sdpa-flash-gqa")

    @property
    def is_ours(self):
        return (self.family or self.name) in OUR_BACKENDS

    def step(self, mode, q, k, v, causal, **extra):
        """A zero-argument call doing ``mode`` once; q, k, v must require grad for "bwd" and "fwd+bwd"."""
        if mode == "fwd":
            return lambda: self.forward(q, k, v, causal, **extra)
        inputs = (q, k, v)
        dout = torch.randn_like(q)
        if mode == "bwd":
            out = self.forward(q, k, v, causal, **extra)
            return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)
        if mode == "fwd+bwd":
            return lambda: torch.autograd.grad(self.forward(q, k, v, causal, **extra), inputs, dout)
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd+bwd', got {mode!r}")


def needs_grad(mode):
    return mode != "fwd"


# ---- our backends -------------------------------------------------------------------------------


def _ours_form(case):
    """The inputs flash_attention takes in ``case``: a varlen batch padded, a score option as keywords."""
    return "padded" if case == "varlen" else "option-ours" if case in OPTIONS else "dense"


def _ours_why_not(backend, case):
    @functools.lru_cache(maxsize=None)
    def why_not(device, dtype, head_dim, causal, mode):
        if backend == "triton" and device.type == "cpu":
            return "Triton runs CPU tensors only in its interpreter, whose speed means nothing"
        # explain takes dense calls: a varlen call is probed as its padded twin, which meets the same
        # device, dtype and build limits (the reasons a backend gives).
        config = probe_config(case, DTYPE_NAMES[dtype], head_dim, causal)
        q, k, v, extra = case_inputs(config, _ours_form(case), device, requires_grad=False)
        try:
            choice = attention.explain(q, k, v, causal=causal, backend=backend, **extra)
        except (TypeError, ValueError) as exc:
            return str(exc)
        if choice.backend is None:
            return "; ".join(choice.passed_over.get(backend, ["cannot run this call"]))
        return None

    return why_not


def ours_provider(backend, case="grid"):
    """flash_attention: the grid's q, k, v; k and v of fewer heads (gqa); a padded batch with its
    key_padding_mask (varlen, the dense path); the score option of an option case as its keywords.
    ``backend`` may be "naive" too (the API's reference path), which the tests use where a kernel
    does not take an option yet."""

    def forward(q, k, v, causal, **extra):
        return attention.flash_attention(q, k, v, causal=causal, backend=backend, **extra)

    extras = {"varlen": ", key_padding_mask", **{option: f", {option} option" for option in OPTIONS}}
    described = f"attention.flash_attention(backend={backend!r})" + extras.get(case, "")
    return Provider(backend, described, forward, _ours_why_not(backend, case), _ours_form(case), backend)


def _ours_varlen(backend):
    """flash_attention_varlen on the packed sequences: no padding at all."""

    def forward(q, k, v, causal, cu_seqlens, max_seqlen):
        return attention.flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=causal,
                                                backend=backend)

    return Provider(f"{backend}-varlen", f"attention.flash_attention_varlen(backend={backend!r}), packed", forward,
                    _ours_why_not(backend, "varlen"), "packed", backend)


# ---- torch SDPA with one backend forced ---------------------------------------------------------

_SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
_CUDA_ONLY_SDPA = ("sdpa-cudnn", "sdpa-efficient")


# What SDPA is given in place of each score option (cases.option_arguments builds it; softcap: nothing).
_SDPA_OPTION_FORMS = {
    "window": ", the window as a bool attn_mask",
    "alibi": ", ALiBi as a float attn_mask (bias)",
    "dropout": ", dropout_p (its own random mask)",
}


def _sdpa(name, case="grid", gqa=False):
    """SDPA on the grid's q, k, v; for gqa on k, v expanded to q's heads, or with ``gqa`` on the
    grouped k, v with enable_gqa=True; for varlen on the padded batch with a boolean attn_mask; for
    a score option with its equivalent: an explicit mask or bias, or SDPA's own dropout (softcap: none)."""
    backend = _SDPA_BACKENDS[name]
    form = {"grid": "dense", "gqa": "dense" if gqa else "expanded", "varlen": "sdpa-mask",
            **{option: "option-sdpa" for option in OPTIONS}}[case]

    def forward(q, k, v, causal, attn_mask=None, dropout_p=0.0):
        # A varlen or option case's attn_mask has the causal triangle in it already: SDPA takes a mask or
        # is_causal.
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                  is_causal=causal and attn_mask is None, enable_gqa=gqa)

    @functools.lru_cache(maxsize=None)
    def why_not(device, dtype, head_dim, causal, mode):
        if case == "softcap":
            return "torch's SDPA has no softcap (the naive attention with softcap is this case's baseline)"
        if name in _CUDA_ONLY_SDPA and device.type != "cuda":
            return f"torch has this SDPA backend for CUDA tensors only, got {device.type}"
        # SDPA says why a forced backend cannot run only in warnings, then raises a generic error.
        config = probe_config(case, DTYPE_NAMES[dtype], head_dim, causal)
        q, k, v, extra = case_inputs(config, form, device, needs_grad(mode))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = forward(q, k, v, causal, **extra)
                if needs_grad(mode):
                    out.sum().backward()
            except RuntimeError as exc:
                details = [str(w.message) for w in caught]
                return "; ".join(details) if details else str(exc).splitlines()[0]
        return None

    described = {"dense": "", "expanded": ", k and v expanded to q's heads", "sdpa-mask": ", padded, boolean attn_mask",
                 "option-sdpa": _SDPA_OPTION_FORMS.get(case, "")}
    return Provider(f"{name}-gqa" if gqa else name,
                    f"torch SDPA forced to {backend.name}" + (", enable_gqa=True" if gqa else described[form]),
                    forward, why_not, form, name)


# ---- FlexAttention, compiled --------------------------------------------------------------------

# Compiled once per shape family, with static shapes (each new N compiles again, as it would in a
# model). All of them share flex_attention's code object, whose recompile limit (8) a sweep passes:
# without a higher one torch would silently run the slow eager version.
FLEX_RECOMPILE_LIMIT = 512


@functools.lru_cache(maxsize=None)
def _compiled_flex(causal, dtype, head_dim):
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, FLEX_RECOMPILE_LIMIT)
    torch._dynamo.config.accumulated_recompile_limit = max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * FLEX_RECOMPILE_LIMIT
    )
    torch._dynamo.config.fail_on_recompile_limit_hit = True  # an error, never a quiet eager fallback
    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=64)
def _causal_block_mask(n_q, n_k, device):
    from torch.nn.attention.flex_attention import create_block_mask

    def bottom_right_causal(batch, head, q_idx, kv_idx):
        return kv_idx <= q_idx + (n_k - n_q)

    return create_block_mask(bottom_right_causal, None, None, n_q, n_k, device=device)


def _flex_forward(q, k, v, causal):
    block_mask = _causal_block_mask(q.shape[2], k.shape[2], q.device) if causal else None
    return _compiled_flex(causal, q.dtype, q.shape[-1])(q, k, v, block_mask=block_mask)


def _flex_why_not(device, dtype, head_dim, causal, mode):
    if device.type == "cpu" and needs_grad(mode):
        return "FlexAttention has no backward on CPU"
    if device.type not in ("cpu", "cuda"):
        return f"FlexAttention is benchmarked on CPU and CUDA, got {device.type}"
    return None


# ---- the plain O(N^2) baseline ------------------------------------------------------------------


def _naive_forward(q, k, v, causal, **extra):
    return attention.naive_attention(q, k, v, causal=causal, **extra)


def _naive(case="grid"):
    """Grouped k, v are expanded inside (timed); a varlen batch is run padded, with its key_padding_mask;
    a score option is passed as naive_attention's keywords (dropout: the keep-mask, made before timing)."""
    form = "padded" if case == "varlen" else "option-naive" if case in OPTIONS else "dense"
    return Provider("naive", "attention.naive_attention in the input dtype", _naive_forward, lambda *_: None, form,
                    "naive")


def all_providers():
    """Every provider of the main grid, ours first, the naive baseline last."""
    return case_providers("grid")


def case_providers(case):
    """The providers of one case (cases.CASES), ours first, the naive baseline last.

    gqa: ours and naive read the grouped k, v; SDPA gets them expanded to q's heads (the copy made
    before timing), and as "<sdpa>-gqa" grouped, with enable_gqa=True. varlen: ours packed
    ("<backend>-varlen") and dense with a key_padding_mask; SDPA and naive get the padded batch.
    Score options (window, softcap, alibi, dropout): ours and naive take the option as arguments,
    SDPA the equivalent mask, bias or dropout_p (cases.FORMS). FlexAttention is in the grid only: on a
    CPU its compile alone would take these cases' time budget.
    """
    sdpa = ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math")
    if case == "grid":
        return [
            *(ours_provider(name) for name in OUR_BACKENDS),
            *(_sdpa(name) for name in sdpa[:3]),
            Provider("flex", "FlexAttention, torch.compile(dynamic=False)", _flex_forward, _flex_why_not),
            _sdpa("sdpa-math"),
            _naive(),
        ]
    if case == "gqa":
        return [*(ours_provider(name, case) for name in OUR_BACKENDS),
                *(provider for name in sdpa for provider in (_sdpa(name, case), _sdpa(name, case, gqa=True))),
                _naive(case)]
    if case == "varlen":
        return [*(_ours_varlen(name) for name in OUR_BACKENDS), *(ours_provider(name, case) for name in OUR_BACKENDS),
                *(_sdpa(name, case) for name in sdpa), _naive(case)]
    if case in OPTIONS:
        return [*(ours_provider(name, case) for name in OUR_BACKENDS), *(_sdpa(name, case) for name in sdpa),
                _naive(case)]
    raise ValueError(f"case must be one of {CASES}, got {case!r}")


def select_providers(names=None, case="grid"):
    """The providers of ``case`` named (all when ``names`` is None), in the order of ``case_providers``.

    A name selects the provider of that name and, in the gqa and varlen cases, its variants: "cpu"
    selects "cpu-varlen" too, "sdpa-flash" "sdpa-flash-gqa". Names of any case are accepted.
    """
    providers = case_providers(case)
    if names is None:
        return providers
    known = {p.name for c in CASES for p in case_providers(c)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {sorted(known)}")
    return [p for p in providers if p.name in names or p.family in names]
