"""The fused kernels as torch ops, so autograd and torch.compile see one opaque call per direction.

Each fused backend has a forward op and a backward op with the arguments csrc/ops.cpp declares:
  fwd(q, k, v, causal, softmax_scale, key_padding_mask?, cu_seqlens_q?, cu_seqlens_k?,
      max_seqlen_q, max_seqlen_k, window_left, window_right, softcap, alibi_slopes?,
      dropout_p, dropout_seed, dropout_offset) -> (o, lse)
  bwd(dout, q, k, v, o, lse, <the same options>) -> (dq, dk, dv)
- ``fused_attention::fwd`` / ``::bwd``: the C++ ops of ``attention._C`` (CPU and, when built, CUDA);
- ``fused_attention_triton::fwd`` / ``::bwd``: the Triton kernels, defined here. Both take one more
  argument, ``deterministic``: the forward only passes it on to the backward (through autograd).
Decoding from a KV cache has one forward op per backend, ``fused_attention::fwd_kvcache`` and
``fused_attention_triton::fwd_kvcache``, with the contract of csrc/checks.h (check_kvcache_inputs):
  fwd_kvcache(q, k_cache, v_cache, seqlens_k, block_table?, causal, softmax_scale, window_left,
              window_right, softcap, alibi_slopes?, num_splits) -> (o_parts, lse_parts)
the key axis split num_splits ways, the parts merged by attention/merge.py. It has no autograd.
q, k, v are 4-D: (B, Hq, Nq, D) and (B, Hkv, Nk, D) (grouped-query heads when Hkv < Hq), or, with
cu_seqlens, flash-attn's packed (total, H, D) tensors seen as (1, H, total, D). Every op gets the same
fake implementation (it gives the outputs' exact layouts) and the same autograd formula. lse is
returned without a gradient: it is marked non-differentiable.
"""
import importlib
from typing import Optional

import torch
from torch import Tensor

from .validation import MAX_HEAD_DIM

try:
    importlib.import_module("attention._C")  # registers fused_attention::fwd/bwd
    EXTENSION_ERROR = None
except ImportError as exc:  # not built (no compiler at install time) or built for another torch
    EXTENSION_ERROR = f"the C++ extension attention._C is not available ({exc})"


@torch.library.custom_op("fused_attention_triton::fwd", mutates_args=())
def triton_forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, softmax_scale: float, key_padding_mask: Optional[Tensor],
    cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
    window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor], dropout_p: float,
    dropout_seed: int, dropout_offset: int, deterministic: bool = True,
) -> tuple[Tensor, Tensor]:
    from .triton_kernels.forward import attention_forward

    return attention_forward(q, k, v, causal, softmax_scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                             max_seqlen_q, max_seqlen_k, window_left, window_right, softcap, alibi_slopes, dropout_p,
                             dropout_seed, dropout_offset)


@torch.library.custom_op("fused_attention_triton::bwd", mutates_args=())
def triton_backward(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, causal: bool, softmax_scale: float,
    key_padding_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int, max_seqlen_k: int, window_left: int, window_right: int, softcap: float,
    alibi_slopes: Optional[Tensor], dropout_p: float, dropout_seed: int, dropout_offset: int,
    deterministic: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    from .triton_kernels.backward import attention_backward

    return attention_backward(dout, q, k, v, o, lse, causal, softmax_scale, deterministic, key_padding_mask,
                              cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, window_left, window_right,
                              softcap, alibi_slopes, dropout_p, dropout_seed, dropout_offset)


@torch.library.custom_op("fused_attention_triton::fwd_kvcache", mutates_args=())
def triton_forward_kvcache(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, seqlens_k: Tensor, block_table: Optional[Tensor], causal: bool,
    softmax_scale: float, window_left: int, window_right: int, softcap: float, alibi_slopes: Optional[Tensor],
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    from .triton_kernels.decode import attention_decode

    return attention_decode(q, k_cache, v_cache, seqlens_k, block_table, causal, softmax_scale, window_left,
                            window_right, softcap, alibi_slopes, num_splits)


def _fake_decode(q, k_cache, v_cache, seqlens_k, block_table, causal, softmax_scale, window_left, window_right,
                 softcap, alibi_slopes, num_splits):
    return (q.new_empty((num_splits, *q.shape), dtype=torch.float32),
            q.new_empty((num_splits, *q.shape[:3]), dtype=torch.float32))


def empty_like_input(t, varlen):
    """A fresh output shaped like the 4-D input t: contiguous, or with cu_seqlens the (1, H, total, D) view
    of a contiguous (total, H, D) tensor, flash-attn's packed layout."""
    if not varlen:
        return t.new_empty(t.shape)
    _, heads, total, head_dim = t.shape
    return t.new_empty(total, heads, head_dim).transpose(0, 1).unsqueeze(0)


def _fake_forward(q, k, v, causal, softmax_scale, key_padding_mask, cu_seqlens_q, cu_seqlens_k, *rest):
    return empty_like_input(q, cu_seqlens_q is not None), q.new_empty(q.shape[:3], dtype=torch.float32)


def _fake_backward(dout, q, k, v, o, lse, causal, softmax_scale, key_padding_mask, cu_seqlens_q, *rest):
    varlen = cu_seqlens_q is not None
    return empty_like_input(q, varlen), empty_like_input(k, varlen), empty_like_input(v, varlen)


# Where the optional tensors sit among the options after (q, k, v): key_padding_mask, cu_seqlens_q,
# cu_seqlens_k, alibi_slopes. They are saved as tensors; the other options ride on ctx as they are.
_TENSOR_OPTIONS = (2, 3, 4, 10)


def _setup_context(ctx, inputs, output):
    q, k, v, *options = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, *(options[i] for i in _TENSOR_OPTIONS))
    ctx.options = [None if i in _TENSOR_OPTIONS else option for i, option in enumerate(options)]
    ctx.mark_non_differentiable(lse)


def _autograd_for(backward_op):
    def backward(ctx, dout, _dlse):
        q, k, v, o, lse, *tensor_options = ctx.saved_tensors
        options = list(ctx.options)
        for i, tensor in zip(_TENSOR_OPTIONS, tensor_options):
            options[i] = tensor
        if dout.stride(-1) != 1:  # e.g. the expanded gradient of o.sum()
            dout = dout.contiguous()
        dq, dk, dv = backward_op(dout, q, k, v, o, lse, *options)
        return dq, dk, dv, *(None for _ in options)

    return backward


def _no_double_backward(ctx, *grads):
    raise RuntimeError("the fused attention kernels have no double backward (a gradient of their gradients); "
                       "backend='naive' has one")


def register_fused_op(fwd_name, bwd_name, backward_op):
    """Gives a forward/backward op pair with the signatures above its fake implementations and autograd.
    The backward op's own autograd raises: without it, a double backward would silently treat the
    gradients as constants."""
    torch.library.register_fake(fwd_name)(_fake_forward)
    torch.library.register_fake(bwd_name)(_fake_backward)
    torch.library.register_autograd(fwd_name, _autograd_for(backward_op), setup_context=_setup_context)
    torch.library.register_autograd(bwd_name, _no_double_backward, setup_context=lambda ctx, inputs, output: None)


register_fused_op("fused_attention_triton::fwd", "fused_attention_triton::bwd", triton_backward)
torch.library.register_fake("fused_attention_triton::fwd_kvcache")(_fake_decode)
if EXTENSION_ERROR is None:
    register_fused_op("fused_attention::fwd", "fused_attention::bwd", torch.ops.fused_attention.bwd)
    torch.library.register_fake("fused_attention::fwd_kvcache")(_fake_decode)

# What the CUDA kernels were built for and need, read once here, so dispatch stays traceable: whether
# attention._C has them, nvcc's targets ("sm_80,compute_90,sm_90"; compute_XY is PTX), and the
# dynamic shared memory per block of the largest kernel of each pass, {(head_dim, backward): bytes}.
HAS_CUDA_KERNELS = EXTENSION_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "fused_attention::fwd", "CUDA"
)
CUDA_TARGETS = torch.ops.fused_attention.cuda_targets() if HAS_CUDA_KERNELS else ""
CUDA_SHARED_MEMORY_BYTES = (
    {
        (head_dim, backward): torch.ops.fused_attention.cuda_shared_memory_bytes(head_dim, backward)
        for head_dim in range(1, MAX_HEAD_DIM + 1)
        for backward in (False, True)
    }
    if HAS_CUDA_KERNELS
    else {}
)
