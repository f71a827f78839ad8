"""A GPT-2 style decoder-only language model on our kernels (after nanoGPT's model.py).

Pre-norm blocks with causal self-attention, learned positions, and the output layer tied to the
token embedding.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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
    def __init__(self, cfg: GPTConfig, backend="auto"):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.positions = LearnedPositionalEncoding(cfg.d_model, cfg.block_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.d_model, cfg.n_heads, 4 * cfg.d_model, causal=True, dropout=cfg.dropout, bias=cfg.bias,
                backend=backend,
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
        x = self.dropout(self.positions(self.token_embed(tokens)))  # (B, N, d_model)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_final(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())

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
