"""Transformer building blocks on our fused attention: multi-head attention, feed-forward, positions.

Every attention layer takes a ``backend`` ("auto", "triton", "cuda", "cpu", "naive") that it hands to
``attention.flash_attention``; ``set_backend(model, name)`` switches all layers of a model at once.
Activations are (batch, seq_len, d_model); the kernels see (batch, heads, seq_len, head_dim).
"""
import math

import torch
from torch import nn

from .api import flash_attention
from .kvcache import flash_attention_with_kvcache
from .backends import BACKENDS
from .distributed import LAYOUTS, ring_attention


def check_backend(backend):
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    return backend


class MultiHeadAttention(nn.Module):
    """Self-attention (one fused QKV projection) or cross-attention (q projection + fused KV projection).

    ``causal`` masks bottom-right, as ``flash_attention`` does: with Nq == Nk that is the usual
    "query i sees keys <= i"; ``window`` = (left, right) limits each query to a band of keys (a
    sliding window, as Mistral's). ``dropout`` drops attention probabilities in training mode, inside
    the fused kernels. q, k and v reach the kernel as strided views of the projection output (no
    copies): the kernels read any layout whose last dim is contiguous.

    ``context_parallel_group``: a torch.distributed process group over which the sequence is sharded
    (context parallelism): x is then this rank's shard (``attention.distributed.shard_sequence`` with
    ``context_parallel_layout``, dim=1) and attention runs as ``ring_attention`` over the group. Self-
    attention without window, dropout or padding mask only.
    """

    def __init__(self, d_model, n_heads, *, causal=False, cross=False, bias=True, backend="auto", window=(-1, -1),
                 dropout=0.0, context_parallel_group=None, context_parallel_layout="zigzag"):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        if context_parallel_group is not None:
            _check_context_parallel(cross, window, dropout, context_parallel_layout)
        self.context_parallel_group, self.context_parallel_layout = context_parallel_group, context_parallel_layout
        self.d_model, self.n_heads, self.head_dim = d_model, n_heads, d_model // n_heads
        self.causal, self.cross, self.window, self.dropout = causal, cross, tuple(window), dropout
        self.backend = backend
        if cross:
            self.q_proj = nn.Linear(d_model, d_model, bias=bias)
            self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=bias)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    @property
    def backend(self):
        return self._backend

    @backend.setter
    def backend(self, name):
        self._backend = check_backend(name)

    def _split_heads(self, x, n_parts):
        # (B, N, n_parts * d_model) -> n_parts views of (B, H, N, head_dim), last dim still contiguous
        batch, seq_len, _ = x.shape
        parts = x.view(batch, seq_len, n_parts, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return parts.unbind(0)

    def project(self, x, context=None):
        """q, k, v as (B, H, N, head_dim) views; keys and values come from ``context`` in cross-attention."""
        if self.cross:
            if context is None:
                raise ValueError("context must be given to a cross-attention layer (cross=True)")
            (q,) = self._split_heads(self.q_proj(x), 1)
            k, v = self._split_heads(self.kv_proj(context), 2)
            return q, k, v
        if context is not None:
            raise ValueError("context must be None for a self-attention layer (cross=False)")
        return self._split_heads(self.qkv_proj(x), 3)

    def forward(self, x, context=None, key_padding_mask=None, kv_cache=None):
        """x: (B, Nq, d_model); context: (B, Nk, d_model) for cross-attention; key_padding_mask: bool
        (B, Nk), True where the key is padding. ``kv_cache`` (a models.kv_cache.LayerCache, generation
        only): x's keys and values are appended to it and x attends to everything cached, through
        ``flash_attention_with_kvcache``. Returns (B, Nq, d_model)."""
        q, k, v = self.project(x, context)
        if kv_cache is not None:
            if self.cross or key_padding_mask is not None or self.context_parallel_group is not None:
                raise ValueError("kv_cache works for self-attention without key_padding_mask or context_parallel_group")
            o = flash_attention_with_kvcache(q, kv_cache.keys, kv_cache.values, kv_cache.seqlens, k_new=k, v_new=v,
                                             block_table=kv_cache.block_table, causal=self.causal, window=self.window,
                                             backend=self.backend)
        elif self.context_parallel_group is not None:
            if key_padding_mask is not None:
                raise ValueError("key_padding_mask must be None with context_parallel_group (the ring has no padding)")
            o = ring_attention(q, k, v, causal=self.causal, group=self.context_parallel_group,
                               layout=self.context_parallel_layout, backend=self.backend)
        else:
            if key_padding_mask is not None:
                batch, n_k = k.shape[0], k.shape[2]
                if key_padding_mask.dtype != torch.bool or tuple(key_padding_mask.shape) != (batch, n_k):
                    raise ValueError(
                        f"key_padding_mask must be a bool tensor of shape (batch, Nk) = {(batch, n_k)}, "
                        f"got {key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                    )
                key_padding_mask = ~key_padding_mask  # flash_attention's mask is True where the key is real
            o = flash_attention(q, k, v, causal=self.causal, backend=self.backend, key_padding_mask=key_padding_mask,
                                window=self.window, dropout_p=self.dropout if self.training else 0.0)
        batch, n_q, _ = x.shape
        return self.out_proj(o.transpose(1, 2).reshape(batch, n_q, self.d_model))

    def extra_repr(self):
        return (
            f"d_model={self.d_model}, n_heads={self.n_heads}, causal={self.causal}, cross={self.cross}, "
            f"window={self.window}, dropout={self.dropout}, backend={self.backend!r}"
        )


def _check_context_parallel(cross, window, dropout, layout):
    if cross:
        raise ValueError("context_parallel_group works for self-attention only (cross=False): ring attention shards "
                         "one sequence for queries and keys alike")
    if tuple(window) != (-1, -1):
        raise ValueError(f"window must be (-1, -1) with context_parallel_group, got {tuple(window)}")
    if dropout != 0.0:
        raise ValueError(f"dropout must be 0 with context_parallel_group, got {dropout}")
    if layout not in LAYOUTS:
        raise ValueError(f"context_parallel_layout must be one of {LAYOUTS}, got {layout!r}")


class FeedForward(nn.Module):
    """Position-wise two-layer MLP: d_model -> d_hidden -> d_model."""

    def __init__(self, d_model, d_hidden, activation=nn.GELU, dropout=0.0, bias=True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d_model, d_hidden, bias=bias),
            activation(),
            nn.Linear(d_hidden, d_model, bias=bias),
            nn.Dropout(dropout),
        )

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-norm block (GPT-2, ViT): x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model, n_heads, d_hidden, *, causal, dropout=0.0, bias=True, backend="auto",
                 context_parallel_group=None, context_parallel_layout="zigzag"):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model, bias=bias)
        self.attn = MultiHeadAttention(d_model, n_heads, causal=causal, bias=bias, backend=backend, dropout=dropout,
                                       context_parallel_group=context_parallel_group,
                                       context_parallel_layout=context_parallel_layout)
        self.dropout = nn.Dropout(dropout)
        self.ln_mlp = nn.LayerNorm(d_model, bias=bias)
        self.mlp = FeedForward(d_model, d_hidden, dropout=dropout, bias=bias)

    def forward(self, x, kv_cache=None):
        x = x + self.dropout(self.attn(self.ln_attn(x), kv_cache=kv_cache))
        return x + self.mlp(self.ln_mlp(x))


def _check_length(seq_len, max_len):
    if seq_len > max_len:
        raise ValueError(f"sequence length {seq_len} exceeds the positional encoding's max_len {max_len}")


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sin/cos encoding of "Attention Is All You Need" to (B, N, d_model) inputs."""

    def __init__(self, d_model, max_len):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * frequency)
        table[:, 1::2] = torch.cos(position * frequency)[:, : d_model // 2]  # odd d_model: one cos fewer
        self.register_buffer("table", table, persistent=False)  # (max_len, d_model)

    def forward(self, x):
        _check_length(x.shape[1], self.table.shape[0])
        return x + self.table[: x.shape[1]].to(x.dtype)


class LearnedPositionalEncoding(nn.Module):
    """Adds a learned embedding of each position to (B, N, d_model) inputs."""

    def __init__(self, d_model, max_len):
        super().__init__()
        self.embedding = nn.Embedding(max_len, d_model)

    def forward(self, x, positions=None):
        """``positions``: the (N,) positions of x's tokens where they are not 0..N-1 (a context-parallel shard)."""
        if positions is None:
            _check_length(x.shape[1], self.embedding.num_embeddings)
            positions = torch.arange(x.shape[1], device=x.device)
        return x + self.embedding(positions)


def set_backend(model, backend):
    """Switch every MultiHeadAttention in ``model`` to ``backend``; returns the model."""
    check_backend(backend)
    for module in model.modules():
        if isinstance(module, MultiHeadAttention):
            module.backend = backend
    return model
