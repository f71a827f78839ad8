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

    def forward(self, tokens, targets=None):
        """tokens: (B, N) ids, N <= block_size. Returns logits (B, N, vocab) and, given targets (B, N),
        the mean cross-entropy (else None)."""
        x = self.dropout(self.positions(self.token_embed(tokens), self._shard_positions(tokens)))  # (B, N, d_model)
        for block in self.blocks:
            x = block(x)
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
    def generate(self, tokens, max_new_tokens, temperature=1.0, generator=None):
        """Extend tokens (B, N) by ``max_new_tokens`` sampled tokens; temperature 0 takes the most likely.

        Rereads the last ``block_size`` tokens each step (no KV cache).
        """
        for _ in range(max_new_tokens):
            logits, _ = self(tokens[:, -self.cfg.block_size :])
            logits = logits[:, -1]  # (B, vocab)
            if temperature == 0:
                next_token = logits.argmax(-1, keepdim=True)
            else:
                probs = torch.softmax(logits / temperature, dim=-1)
                next_token = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, next_token], dim=1)
        return tokens
