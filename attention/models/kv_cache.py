"""A KV cache for generation: every attention layer's keys and values of the tokens seen so far.

Dense: one (B, H, capacity, D) slab per layer. Paged (vLLM's layout): per layer a pool of blocks
(num_blocks, H, block_size, D) shared by the batch, each sequence's blocks listed in ``block_table``
(B, blocks per sequence). Here every sequence takes its blocks up front, in an order an allocator
could have handed out; the kernels read any order.
"""
from dataclasses import dataclass

import torch


@dataclass
class LayerCache:
    """One layer's view: what ``flash_attention_with_kvcache`` takes (the lengths shared by all layers)."""

    keys: torch.Tensor
    values: torch.Tensor
    seqlens: torch.Tensor  # int32 (B,): tokens cached before this step
    block_table: torch.Tensor | None


class KVCache:
    def __init__(self, n_layers, batch, heads, capacity, head_dim, *, paged=False, block_size=16, device=None,
                 dtype=torch.float32):
        self.capacity, self.length = capacity, 0
        self.seqlens = torch.zeros(batch, dtype=torch.int32, device=device)
        if paged:
            blocks_per_sequence = -(-capacity // block_size)
            # Interleaved across sequences, as blocks handed out step by step to a batch would be.
            order = torch.arange(batch * blocks_per_sequence, dtype=torch.int32, device=device)
            self.block_table = order.reshape(blocks_per_sequence, batch).t().contiguous()
            shape = (batch * blocks_per_sequence, heads, block_size, head_dim)
        else:
            self.block_table = None
            shape = (batch, heads, capacity, head_dim)
        self.layers = [LayerCache(torch.zeros(shape, device=device, dtype=dtype),
                                  torch.zeros(shape, device=device, dtype=dtype), self.seqlens, self.block_table)
                       for _ in range(n_layers)]

    def check_room(self, n_tokens):
        """Raise unless n_tokens more fit (before a model step writes them)."""
        if self.length + n_tokens > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens: {self.length} + {n_tokens} do not fit")

    def advance(self, n_tokens):
        """Counts the n_tokens every layer has just appended (once per model step, after all layers)."""
        self.length += n_tokens
        self.seqlens += n_tokens
