"""Triton flash-attention kernels and their launchers (installed as ``attention.triton_kernels``).

``attention_forward(q, k, v, causal, softmax_scale, key_padding_mask=None, cu_seqlens_q=None,
cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0, window_left=-1, window_right=-1, softcap=0.0,
alibi_slopes=None, dropout_p=0.0, dropout_seed=0, dropout_offset=0) -> (o, lse)`` and
``attention_backward(do, q, k, v, o, lse, causal, softmax_scale, deterministic, <the same options>) ->
(dq, dk, dv)`` take (B, H, N, D) tensors
(k and v may have fewer heads: grouped-query attention; varlen: views of packed (total, H, D) tensors) the
caller has already validated. Importing this package imports triton, and under
``TRITON_INTERPRET=1`` (read at import) the kernels run on CPU tensors through Triton's interpreter.
"""
from .backward import attention_backward
from .forward import attention_forward

__all__ = ["attention_backward", "attention_forward"]
