"""Which backend runs a call, and why the others do not.

Each backend answers ``why_not(q, k, v)`` with a list of reasons (empty: it can run the call).
``"auto"`` walks the device's preference order and takes the first with no reasons; an explicit
backend that cannot run raises with its reasons; ``explain`` shows the whole decision.
"""
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import ops
from .reference import naive_attention

BACKENDS = ("triton", "cuda", "cpu", "naive")

# Fastest first. Triton leads on CUDA until the CUDA C++ kernels have been measured against it.
AUTO_ORDER = {"cuda": ("triton", "cuda", "naive"), "cpu": ("cpu", "naive")}

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _fused_forward(op):
    def run(q, k, v, causal, softmax_scale):
        return op(_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), causal, softmax_scale)

    return run


def _run_naive(q, k, v, causal, softmax_scale):
    return naive_attention(q, k, v, causal=causal, softmax_scale=softmax_scale, return_lse=True)


def _empty_reasons(q, k):
    if q.numel() == 0 or k.shape[2] == 0:
        return [f"empty input (q {tuple(q.shape)}, k {tuple(k.shape)}): the naive path handles it"]
    return []


def _triton_why_not(q, k, v):
    if not TRITON_INSTALLED:
        return ["triton is not installed"]
    if q.device.type == "cpu" and not TRITON_INTERPRET:
        return ["CPU tensors run on Triton only under TRITON_INTERPRET=1 (a slow interpreter, for testing)"]
    if q.device.type not in ("cpu", "cuda"):
        return [f"Triton runs CUDA tensors, got {q.device.type}"]
    return _empty_reasons(q, k)


def _cuda_why_not(q, k, v):
    if ops.EXTENSION_ERROR is not None:
        return [ops.EXTENSION_ERROR]
    if not ops.HAS_CUDA_KERNELS:
        return ["attention._C was built without CUDA kernels (no CUDA toolkit or a CPU build of torch at install)"]
    reasons = [] if q.device.type == "cuda" else [f"the CUDA kernels run CUDA tensors, got {q.device.type}"]
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"the CUDA kernels take float16 or bfloat16, got {q.dtype}")
    return reasons + _empty_reasons(q, k)


def _cpu_why_not(q, k, v):
    if ops.EXTENSION_ERROR is not None:
        return [ops.EXTENSION_ERROR]
    reasons = [] if q.device.type == "cpu" else [f"the C++ CPU kernels run CPU tensors, got {q.device.type}"]
    return reasons + _empty_reasons(q, k)


@dataclass(frozen=True)
class Backend:
    name: str
    why_not: Callable  # (q, k, v) -> list[str]
    forward: Callable  # (q, k, v, causal, softmax_scale) -> (o, lse), differentiable in q, k, v


# One C++ op serves both devices; looked up at call time, since attention._C may be missing.
_cpp_forward = _fused_forward(lambda *args: torch.ops.fused_attention.fwd(*args))

_REGISTRY = {
    "triton": Backend("triton", _triton_why_not, _fused_forward(torch.ops.fused_attention_triton.fwd)),
    "cuda": Backend("cuda", _cuda_why_not, _cpp_forward),
    "cpu": Backend("cpu", _cpu_why_not, _cpp_forward),
    "naive": Backend("naive", lambda q, k, v: [], _run_naive),
}


@dataclass
class Explanation:
    """The backend a call takes (None if none can) and, for every backend considered, why not."""

    backend: str | None
    passed_over: dict[str, list[str]] = field(default_factory=dict)
    torch_fallback: list[str] = field(default_factory=list)  # scaled_dot_product_attention only

    def __str__(self):
        if self.torch_fallback:
            lines = ["torch.nn.functional.scaled_dot_product_attention (our kernels do not do this call):"]
            lines += [f"  - {r}" for r in self.torch_fallback]
            return "\n".join(lines)
        lines = [f"backend: {self.backend}" if self.backend else "no backend can run this call"]
        for name, reasons in self.passed_over.items():
            lines.append(f"  {name}: " + "; ".join(reasons))
        return "\n".join(lines)


def _check_backend_name(backend):
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


def explain_choice(q, k, v, backend="auto") -> Explanation:
    _check_backend_name(backend)
    candidates = AUTO_ORDER.get(q.device.type, ("naive",)) if backend == "auto" else (backend,)
    passed_over = {}
    for name in candidates:
        reasons = _REGISTRY[name].why_not(q, k, v)
        if not reasons:
            return Explanation(name, passed_over)
        passed_over[name] = reasons
    return Explanation(None, passed_over)


def select_backend(q, k, v, backend="auto") -> Backend:
    choice = explain_choice(q, k, v, backend)
    if choice.backend is None:
        raise RuntimeError(f"backend={backend!r} cannot run this call:\n{choice}")
    return _REGISTRY[choice.backend]


def available_backends(device="cpu") -> list[str]:
    """The backends that can run some call on this device (shape and dtype limits aside)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return []
    probe = torch.empty(1, 1, 1, 16, device=device, dtype=torch.float16)
    return [name for name in BACKENDS if not _REGISTRY[name].why_not(probe, probe, probe)]
