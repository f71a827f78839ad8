"""The encoder-decoder Transformer of "Attention Is All You Need" (Vaswani et al., 2017) on our kernels.

Post-norm by default, as in the paper (x = norm(x + sublayer(x))); ``norm_first=True`` gives the
pre-norm variant (x = x + sublayer(norm(x)), plus a final norm), which trains more easily when deep.
Encoder self-attention is non-causal, decoder self-attention causal, and each decoder layer
cross-attends to the encoder output (Nq = target length, Nk = source length).
"""
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import FeedForward, MultiHeadAttention, SinusoidalPositionalEncoding


@dataclass
class TransformerConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    max_len: int = 512
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    norm_first: bool = False  # False: post-norm (the paper); True: pre-norm
    tie_embeddings: bool = True  # one matrix for source and target embeddings and the output layer


class Residual(nn.Module):
    """One sublayer with its residual connection and LayerNorm, post- or pre-norm."""

    def __init__(self, d_model, dropout, norm_first):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x, sublayer):
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, backend):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, backend=backend, dropout=cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, activation=nn.ReLU)
        self.attn_residual = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.ff_residual = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)

    def forward(self, x, src_padding_mask=None):  # x: (B, S, d_model)
        x = self.attn_residual(x, lambda h: self.self_attn(h, key_padding_mask=src_padding_mask))
        return self.ff_residual(x, self.ff)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TransformerConfig, backend):
        super().__init__()
        self.self_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, causal=True, backend=backend, dropout=cfg.dropout)
        self.cross_attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cross=True, backend=backend, dropout=cfg.dropout)
        self.ff = FeedForward(cfg.d_model, cfg.d_ff, activation=nn.ReLU)
        self.self_residual = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.cross_residual = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)
        self.ff_residual = Residual(cfg.d_model, cfg.dropout, cfg.norm_first)

    def forward(self, y, memory, src_padding_mask=None):  # y: (B, T, d_model), memory: (B, S, d_model)
        y = self.self_residual(y, self.self_attn)
        y = self.cross_residual(y, lambda h: self.cross_attn(h, memory, key_padding_mask=src_padding_mask))
        return self.ff_residual(y, self.ff)


class Transformer(nn.Module):
    def __init__(self, cfg: TransformerConfig, backend="auto"):
        super().__init__()
        if cfg.tie_embeddings and cfg.src_vocab_size != cfg.tgt_vocab_size:
            raise ValueError(
                f"tie_embeddings needs one shared vocabulary, got src_vocab_size={cfg.src_vocab_size} "
                f"and tgt_vocab_size={cfg.tgt_vocab_size}"
            )
        self.cfg = cfg
        self.tgt_embed = nn.Embedding(cfg.tgt_vocab_size, cfg.d_model)
        self.src_embed = self.tgt_embed if cfg.tie_embeddings else nn.Embedding(cfg.src_vocab_size, cfg.d_model)
        self.positions = SinusoidalPositionalEncoding(cfg.d_model, cfg.max_len)
        self.dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, backend) for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg, backend) for _ in range(cfg.n_decoder_layers))
        # Pre-norm leaves the residual stream unnormalized: normalize it once at the end of each stack.
        self.encoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(cfg.d_model) if cfg.norm_first else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.tgt_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tgt_embed.weight
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            # Scaled by sqrt(d_model) in _embed: unit-size inputs, and O(1) logits when tied to lm_head.
            nn.init.normal_(module.weight, std=self.cfg.d_model**-0.5)

    def _embed(self, embedding, tokens):  # (B, N) -> (B, N, d_model)
        return self.dropout(self.positions(embedding(tokens) * math.sqrt(self.cfg.d_model)))

    def encode(self, src, src_padding_mask=None):
        """src: (B, S) token ids; src_padding_mask: bool (B, S), True at padding. Returns (B, S, d_model)."""
        x = self._embed(self.src_embed, src)
        for layer in self.encoder:
            x = layer(x, src_padding_mask)
        return self.encoder_norm(x)

    def decode(self, tgt, memory, src_padding_mask=None):
        """tgt: (B, T) token ids (starting with BOS); memory: (B, S, d_model). Returns logits (B, T, vocab)."""
        y = self._embed(self.tgt_embed, tgt)
        for layer in self.decoder:
            y = layer(y, memory, src_padding_mask)
        return self.lm_head(self.decoder_norm(y))

    def forward(self, src, tgt, src_padding_mask=None):
        return self.decode(tgt, self.encode(src, src_padding_mask), src_padding_mask)

    @torch.no_grad()
    def greedy_decode(self, src, bos_id, max_new_tokens, src_padding_mask=None):
        """Encode once, then append the most likely next token ``max_new_tokens`` times.

        Returns (B, max_new_tokens) token ids, BOS excluded. The decoder reruns over the whole prefix
        each step (no KV cache): simple, and fine for the short outputs of the demo tasks.
        """
        memory = self.encode(src, src_padding_mask)
        tgt = torch.full((src.shape[0], 1), bos_id, dtype=torch.long, device=src.device)
        for _ in range(max_new_tokens):
            next_token = self.decode(tgt, memory, src_padding_mask)[:, -1].argmax(-1, keepdim=True)
            tgt = torch.cat([tgt, next_token], dim=1)
        return tgt[:, 1:]
