"""Which backend runs a call, and why the others do not; what each backend runs.

Each backend answers ``why_not(q, k, v, options)`` with a list of reasons (empty: it can run the call).
``"auto"`` walks the device's preference order and takes the first with no reasons; an explicit
backend that cannot run raises with its reasons; ``explain`` shows the whole decision, the backends
``"auto"`` never considers on that device included.
"""
import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import ops
from .dropout import dropout_mask
from .reference import naive_attention, naive_attention_varlen, naive_attention_with_kvcache
from .validation import AttentionOptions

BACKENDS = ("triton", "cuda", "cpu", "naive")

# Fastest first. Triton leads on CUDA until the CUDA C++ kernels have been measured against it.
AUTO_ORDER = {"cuda": ("triton", "cuda", "naive"), "cpu": ("cpu", "naive")}

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _last_dim_contiguous(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _fused_forward(op, takes_deterministic=False):
    def run(q, k, v, options: AttentionOptions):
        args = (_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), *options.op_args())
        # Only the Triton backward has a non-deterministic variant; the others always are deterministic.
        return op(*args, options.deterministic) if takes_deterministic else op(*args)

    return run


def _fused_backward(op, takes_deterministic=False):
    def run(dout, q, k, v, o, lse, options: AttentionOptions):
        args = (_last_dim_contiguous(dout), *(_last_dim_contiguous(t) for t in (q, k, v, o)), lse, *options.op_args())
        return op(*args, options.deterministic) if takes_deterministic else op(*args)

    return run


def _fused_decode(op):
    def run(q, k_cache, v_cache, seqlens_k, block_table, options: AttentionOptions, num_splits):
        return op(_last_dim_contiguous(q), k_cache, v_cache, seqlens_k, block_table, *options.decode_args(), num_splits)

    return run


def _naive(q, k, v, options: AttentionOptions):
    """(o, lse) of the naive attention, both differentiable."""
    modifiers = dict(window=options.window, softcap=options.softcap, alibi_slopes=options.alibi_slopes,
                     dropout_p=options.dropout_p)
    batch = options.cu_seqlens_q.numel() - 1 if options.varlen else q.shape[0]
    n_q, n_k = (options.max_seqlen_q, options.max_seqlen_k) if options.varlen else (q.shape[2], k.shape[2])
    if options.dropout_p > 0:
        modifiers["dropout_mask"] = dropout_mask(options.dropout_p, options.dropout_seed, options.dropout_offset, batch,
                                                 q.shape[1], n_q, n_k, q.device)
    if options.varlen:  # back to flash-attn's packed (total, H, D) layout, one call per sequence
        packed = lambda t: t[0].transpose(0, 1)
        o, lse = naive_attention_varlen(packed(q), packed(k), packed(v), options.cu_seqlens_q, options.cu_seqlens_k,
                                        options.causal, options.softmax_scale, return_lse=True, **modifiers)
        return o.transpose(0, 1)[None], lse[None]
    return naive_attention(q, k, v, causal=options.causal, softmax_scale=options.softmax_scale, return_lse=True,
                           key_padding_mask=options.key_padding_mask, **modifiers)


def _run_naive(q, k, v, options: AttentionOptions):
    # lse without gradient, as the fused ops return it (they mark it non-differentiable): a caller
    # gets the same autograd graph whichever backend runs.
    o, lse = _naive(q, k, v, options)
    return o, lse.detach()


def _naive_backward(dout, q, k, v, o, lse, options: AttentionOptions):
    """dq, dk, dv of these keys' share of an output o with log-sum-exp lse that may span more keys (a
    ring step): the fused backwards' dS = P (dP - rowsum(dO o)) with P = exp(s - lse), by autograd.
    With this call's own (o_b, lse_b) and w = exp(lse_b - lse), o = w o_b + (other keys' terms) and lse
    moves with s as w does, so the gradient is that of sum(w (dO · o_b) - w (dO · o)) with o, lse fixed."""
    with torch.enable_grad():
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        o_b, lse_b = _naive(q, k, v, options)
        seen = lse.isfinite()
        w = torch.where(seen, torch.exp(lse_b.float() - torch.where(seen, lse, 0.0)), 0.0)
        delta = (dout.float() * o.float()).sum(-1)
        share = (w * ((dout.float() * o_b.float()).sum(-1) - delta)).sum()
        return torch.autograd.grad(share, (q, k, v))


def _naive_decode(q, k_cache, v_cache, seqlens_k, block_table, options: AttentionOptions, num_splits):
    """The naive attention over the whole cache: one part, whatever num_splits says."""
    o, lse = naive_attention_with_kvcache(q, k_cache, v_cache, seqlens_k, block_table, options.causal,
                                          options.softmax_scale, return_lse=True, window=options.window,
                                          softcap=options.softcap, alibi_slopes=options.alibi_slopes)
    return o.float()[None], lse.float()[None]


def _empty_reasons(q, k):
    if q.numel() == 0 or k.shape[2] == 0:
        return [f"empty input (q {tuple(q.shape)}, k {tuple(k.shape)}): the naive path handles it"]
    return []


def _triton_why_not(q, k, v, options):
    if not TRITON_INSTALLED:
        return ["triton is not installed"]
    if q.device.type == "cpu" and not TRITON_INTERPRET:
        return ["CPU tensors run on Triton only under TRITON_INTERPRET=1 (a slow interpreter, for testing)"]
    if q.device.type not in ("cpu", "cuda"):
        return [f"Triton runs CUDA tensors, got {q.device.type}"]
    return _empty_reasons(q, k)


# mma.sync on bf16 and cp.async, which the CUDA kernels are built on, arrived with sm_80.
CUDA_MIN_CAPABILITY = (8, 0)


def cuda_image_problem(capability, targets):
    """Why a GPU of compute capability (major, minor) has no kernel image among nvcc's `targets`
    ("sm_80,compute_90,sm_90"), or None. A binary sm_XY runs on any X.y with y >= Y (sm_XYa on X.Y
    only); PTX compute_XY is JIT-compiled by the driver for X.Y and every newer GPU."""
    for target in targets.split(","):
        kind, _, arch = target.partition("_")
        match = re.fullmatch(r"(\d+)(\d)([af]?)", arch)
        if kind not in ("sm", "compute") or match is None:
            continue
        built = (int(match[1]), int(match[2]))
        if match[3] == "a":  # architecture-specific features: that exact GPU only
            runs = capability == built
        elif kind == "sm" or match[3] == "f":  # binaries (and family PTX) stay within one major version
            runs = capability[0] == built[0] and capability[1] >= built[1]
        else:
            runs = capability >= built
        if runs:
            return None
    version = f"{capability[0]}.{capability[1]}"
    return (f"attention._C has no kernel image for compute capability {version} (built for {targets}): "
            f"reinstall with TORCH_CUDA_ARCH_LIST={version}")


def cuda_device_problems(capability, shared_memory_limit, targets, shared_memory_needed):
    """Why the CUDA kernels cannot run on a GPU of `capability` (major, minor) that lets a block opt in
    to `shared_memory_limit` bytes, when built for nvcc `targets` and needing, per pass to run,
    `shared_memory_needed` {"forward": bytes, "backward": bytes}. Pure, so it is tested without a GPU."""
    if capability < CUDA_MIN_CAPABILITY:
        return [f"the CUDA kernels need compute capability 8.0 or newer, this GPU has {capability[0]}.{capability[1]}"]
    problems = [p for p in [cuda_image_problem(capability, targets)] if p]
    for name, needed in shared_memory_needed.items():
        if needed > shared_memory_limit:
            problems.append(f"the {name} kernels need {needed} bytes of shared memory per block, "
                            f"above this GPU's {shared_memory_limit}")
    return problems


def _cuda_device_reasons(q, k, v):
    """What keeps the CUDA kernels off this call's GPU: its capability, kernel image, shared memory."""
    device = torch.cuda.get_device_properties(q.device)
    passes = ["forward"]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        passes.append("backward")
    needed = {p: ops.CUDA_SHARED_MEMORY_BYTES[(q.shape[-1], p == "backward")] for p in passes}
    return cuda_device_problems((device.major, device.minor), device.shared_memory_per_block_optin,
                                ops.CUDA_TARGETS, needed)


def _cuda_why_not(q, k, v, options):
    if ops.EXTENSION_ERROR is not None:
        return [ops.EXTENSION_ERROR]
    if not ops.HAS_CUDA_KERNELS:
        return ["attention._C was built without CUDA kernels (no usable CUDA toolkit or a CPU build of torch at "
                "install; `pip install -v` prints why)"]
    reasons = [] if q.device.type == "cuda" else [f"the CUDA kernels run CUDA tensors, got {q.device.type}"]
    if q.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"the CUDA kernels take float16 or bfloat16, got {q.dtype}")
    if q.device.type == "cuda":
        reasons += _cuda_device_reasons(q, k, v)
    return reasons + _empty_reasons(q, k)


def _cpu_why_not(q, k, v, options):
    if ops.EXTENSION_ERROR is not None:
        return [ops.EXTENSION_ERROR]
    reasons = [] if q.device.type == "cpu" else [f"the C++ CPU kernels run CPU tensors, got {q.device.type}"]
    return reasons + _empty_reasons(q, k)


@dataclass(frozen=True)
class Backend:
    name: str
    why_not: Callable  # (q, k, v, options) -> list[str]
    forward: Callable  # (q, k, v, options) -> (o, lse), differentiable in q, k, v
    # (dout, q, k, v, o, lse, options) -> (dq, dk, dv). o and lse may span more keys than k and v
    # hold (merged over a ring): these keys' share of the gradient, the ring backward's step.
    backward: Callable | None = None
    # (q, k_cache, v_cache, seqlens_k, block_table, options, num_splits) -> (o_parts, lse_parts), the
    # fwd_kvcache op's contract (csrc/checks.h, check_kvcache_inputs).
    decode: Callable | None = None


# One C++ op serves both devices; looked up at call time, since attention._C may be missing.
_cpp = dict(forward=_fused_forward(lambda *args: torch.ops.fused_attention.fwd(*args)),
            backward=_fused_backward(lambda *args: torch.ops.fused_attention.bwd(*args)),
            decode=_fused_decode(lambda *args: torch.ops.fused_attention.fwd_kvcache(*args)))

_REGISTRY = {
    "triton": Backend("triton", _triton_why_not, _fused_forward(torch.ops.fused_attention_triton.fwd, True),
                      _fused_backward(torch.ops.fused_attention_triton.bwd, True),
                      _fused_decode(torch.ops.fused_attention_triton.fwd_kvcache)),
    "cuda": Backend("cuda", _cuda_why_not, **_cpp),
    "cpu": Backend("cpu", _cpu_why_not, **_cpp),
    "naive": Backend("naive", lambda q, k, v, options: [], _run_naive, _naive_backward, _naive_decode),
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


def explain_choice(q, k, v, options, backend="auto") -> Explanation:
    """``backend`` is a name or, for tests of a backend outside the registry (the emulated CUDA
    kernels), a Backend."""
    if isinstance(backend, Backend):
        reasons = backend.why_not(q, k, v, options)
        return Explanation(None if reasons else backend.name, {backend.name: reasons} if reasons else {})
    _check_backend_name(backend)
    candidates = AUTO_ORDER.get(q.device.type, ("naive",)) if backend == "auto" else (backend,)
    passed_over, chosen = {}, None
    for name in candidates:
        reasons = _REGISTRY[name].why_not(q, k, v, options)
        if not reasons:
            chosen = name
            break
        passed_over[name] = reasons
    if backend == "auto":  # say why the backends of other devices were not considered at all
        for name in BACKENDS:
            if name not in candidates:
                passed_over[name] = _REGISTRY[name].why_not(q, k, v, options) or [
                    f"auto does not take it for {q.device.type} tensors (ask for it by name)"]
    return Explanation(chosen, passed_over)


def select_backend(q, k, v, options, backend="auto") -> Backend:
    choice = explain_choice(q, k, v, options, backend)
    if choice.backend is None:
        name = backend.name if isinstance(backend, Backend) else backend
        raise RuntimeError(f"backend={name!r} cannot run this call:\n{choice}")
    return backend if isinstance(backend, Backend) else _REGISTRY[choice.backend]


def fused_backend(name, forward_op, why_not, backward_op=None, decode_op=None):
    """A Backend running ops with the fused ops' signatures (see ops.py), for the test grid."""
    return Backend(name, why_not, _fused_forward(forward_op), backward_op and _fused_backward(backward_op),
                   decode_op and _fused_decode(decode_op))


def available_backends(device="cpu") -> list[str]:
    """The backends that can run some call on this device (shape and dtype limits aside)."""
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return []
    probe = torch.empty(1, 1, 1, 16, device=device, dtype=torch.float16)
    options = AttentionOptions(causal=False, softmax_scale=0.25)
    return [name for name in BACKENDS if not _REGISTRY[name].why_not(probe, probe, probe, options)]
