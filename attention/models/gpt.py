"""A GPT-2 style decoder-only language model on our kernels (after nanoGPT's model.py).

Pre-norm blocks with causal self-attention, learned positions, and the output layer tied to the
token embedding.
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..distributed import shard_sequence
from ..nn import LearnedPositionalEncoding, TransformerBlock
from .kv_cache import KVCache


@dataclass
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # longest sequence the learned positions cover
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    dropout: float = 0.0
    bias: bool = True


class GPT(nn.Module):
    """``context_parallel_group``: run attention context-parallel over this process group; forward then
    takes this rank's shard (``shard_sequence(tokens, rank, W, context_parallel_layout, dim=1)``) of the
    tokens and targets, and the loss is the mean over the shard (average the gradients over the group)."""

    def __init__(self, cfg: GPTConfig, backend="auto", context_parallel_group=None, context_parallel_layout="zigzag"):
        super().__init__()
        self.cfg = cfg
        self.context_parallel_group, self.context_parallel_layout = context_parallel_group, context_parallel_layout
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = LearnedPositionalEncoding(cfg.d_model, cfg.block_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.d_model, cfg.n_heads, 4 * cfg.d_model, causal=True, dropout=cfg.dropout, bias=cfg.bias,
                backend=backend, context_parallel_group=context_parallel_group,
                context_parallel_layout=context_parallel_layout,
            )
            for _ in range(cfg.n_layers)
        )
        self.ln_final = nn.LayerNorm(cfg.d_model, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.token_embed.weight
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens, targets=None, kv_cache=None):
        """tokens: (B, N) ids, N <= block_size. Returns logits (B, N, vocab) and, given targets (B, N),
        the mean cross-entropy (else None). With ``kv_cache`` (a KVCache, generation) the tokens follow
        those already cached: their keys and values are appended and they attend to all of them."""
        if kv_cache is None:
            positions = self._shard_positions(tokens)
        else:
            kv_cache.check_room(tokens.shape[1])
            positions = torch.arange(kv_cache.length, kv_cache.length + tokens.shape[1], device=tokens.device)
        x = self.dropout(self.positions(self.token_embed(tokens), positions))  # (B, N, d_model)
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=None if kv_cache is None else kv_cache.layers[i])
        if kv_cache is not None:
            kv_cache.advance(tokens.shape[1])
        logits = self.lm_head(self.ln_final(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def _shard_positions(self, tokens):
        """The positions of a context-parallel shard's tokens in the whole sequence (None without one)."""
        if self.context_parallel_group is None:
            return None
        world_size = dist.get_world_size(self.context_parallel_group)
        seq_len = tokens.shape[1] * world_size
        if seq_len > self.cfg.block_size:
            raise ValueError(f"sequence length {seq_len} ({world_size} shards of {tokens.shape[1]}) exceeds "
                             f"block_size {self.cfg.block_size}")
        return shard_sequence(torch.arange(seq_len, device=tokens.device), dist.get_rank(self.context_parallel_group),
                              world_size, self.context_parallel_layout, dim=0)

    @torch.no_grad()
    def generate(self, tokens, max_new_tokens, temperature=1.0, generator=None, cache=None, block_size=16):
        """Extend tokens (B, N) by ``max_new_tokens`` sampled tokens; temperature 0 takes the most likely.

        ``cache=None`` rereads the last ``block_size`` tokens each step. ``cache="dense"`` or ``"paged"``
        (blocks of ``block_size`` tokens) runs the prompt once, then one token per step against a KV cache
        through ``flash_attention_with_kvcache``; the whole sequence must then fit cfg.block_size.
        """
        if cache not in (None, "dense", "paged"):
            raise ValueError(f"cache must be None, 'dense' or 'paged', got {cache!r}")
        kv_cache = None
        if cache is not None:
            total = tokens.shape[1] + max_new_tokens
            if total > self.cfg.block_size:
                raise ValueError(f"with a KV cache the prompt and new tokens ({total}) must fit block_size "
                                 f"{self.cfg.block_size}")
            weight = self.token_embed.weight
            kv_cache = KVCache(self.cfg.n_layers, tokens.shape[0], self.cfg.n_heads, total,
                               self.cfg.d_model // self.cfg.n_heads, paged=cache == "paged", block_size=block_size,
                               device=weight.device, dtype=weight.dtype)
        step_input = tokens
        for _ in range(max_new_tokens):
            if kv_cache is None:
                logits, _ = self(tokens[:, -self.cfg.block_size :])
            else:
                logits, _ = self(step_input, kv_cache=kv_cache)
            logits = logits[:, -1]  # (B, vocab)
            if temperature == 0:
                next_token = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, next_token], dim=1)
            step_input = next_token
        return tokens
