"""The attention implementations a benchmark compares, each with a "why not" check.

A provider is a forward function ``(q, k, v, causal) -> o`` on (B, H, N, D) tensors with Nq == Nk
(so SDPA's top-left causal mask and our bottom-right one agree), plus ``why_not``, which names the
reason it cannot run a (device, dtype, head_dim, causal, mode) family, or returns None. Every mode's
timed step (forward, backward, both) is built from the forward the same way for all providers.
"""
import functools
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import attention

OUR_BACKENDS = ("triton", "cuda", "cpu")


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    forward: Callable  # (q, k, v, causal) -> o
    why_not: Callable  # (device, dtype, head_dim, causal, mode) -> str | None

    @property
    def is_ours(self):
        return self.name in OUR_BACKENDS

    def step(self, mode, q, k, v, causal):
        """A zero-argument call doing ``mode`` once; q, k, v must require grad for "bwd" and "fwd+bwd"."""
        if mode == "fwd":
            return lambda: self.forward(q, k, v, causal)
        inputs = (q, k, v)
        dout = torch.randn_like(q)
        if mode == "bwd":
            out = self.forward(q, k, v, causal)
            return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)
        if mode == "fwd+bwd":
            return lambda: torch.autograd.grad(self.forward(q, k, v, causal), inputs, dout)
        raise ValueError(f"mode must be 'fwd', 'bwd' or 'fwd+bwd', got {mode!r}")


def needs_grad(mode):
    return mode != "fwd"


def _probe_inputs(device, dtype, head_dim, mode):
    return [
        torch.randn(1, 2, 16, head_dim, device=device, dtype=dtype, requires_grad=needs_grad(mode))
        for _ in range(3)
    ]


# ---- our backends -------------------------------------------------------------------------------


def _ours(backend):
    def forward(q, k, v, causal):
        return attention.flash_attention(q, k, v, causal=causal, backend=backend)

    @functools.lru_cache(maxsize=None)
    def why_not(device, dtype, head_dim, causal, mode):
        if backend == "triton" and device.type == "cpu":
            return "Triton runs CPU tensors only in its interpreter, whose speed means nothing"
        q, k, v = _probe_inputs(device, dtype, head_dim, "fwd")
        try:
            choice = attention.explain(q, k, v, causal=causal, backend=backend)
        except (TypeError, ValueError) as exc:
            return str(exc)
        if choice.backend is None:
            return "; ".join(choice.passed_over.get(backend, ["cannot run this call"]))
        return None

    return Provider(backend, f"attention.flash_attention(backend={backend!r})", forward, why_not)


# ---- torch SDPA with one backend forced ---------------------------------------------------------

_SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
_CUDA_ONLY_SDPA = ("sdpa-cudnn", "sdpa-efficient")


def _sdpa(name):
    backend = _SDPA_BACKENDS[name]

    def forward(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    @functools.lru_cache(maxsize=None)
    def why_not(device, dtype, head_dim, causal, mode):
        if name in _CUDA_ONLY_SDPA and device.type != "cuda":
            return f"torch has this SDPA backend for CUDA tensors only, got {device.type}"
        # SDPA says why a forced backend cannot run only in warnings, then raises a generic error.
        q, k, v = _probe_inputs(device, dtype, head_dim, mode)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = forward(q, k, v, causal)
                if needs_grad(mode):
                    out.sum().backward()
            except RuntimeError as exc:
                details = [str(w.message) for w in caught]
                return "; ".join(details) if details else str(exc).splitlines()[0]
        return None

    return Provider(name, f"torch SDPA forced to {backend.name}", forward, why_not)


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


def _naive_forward(q, k, v, causal):
    return attention.naive_attention(q, k, v, causal=causal)


def all_providers():
    """Every provider, ours first, the naive baseline last."""
    return [
        *(_ours(name) for name in OUR_BACKENDS),
        *(_sdpa(name) for name in ("sdpa-flash", "sdpa-cudnn", "sdpa-efficient")),
        Provider("flex", "FlexAttention, torch.compile(dynamic=False)", _flex_forward, _flex_why_not),
        _sdpa("sdpa-math"),
        Provider("naive", "attention.naive_attention in the input dtype", _naive_forward, lambda *_: None),
    ]


def select_providers(names=None):
    """The providers named (all when ``names`` is None), in the order of ``all_providers``."""
    providers = all_providers()
    if names is None:
        return providers
    known = {p.name for p in providers}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {sorted(known)}")
    return [p for p in providers if p.name in names]
