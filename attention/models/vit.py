"""A Vision Transformer classifier (Dosovitskiy et al., 2020) on our kernels.

Patches embedded by a strided Conv2d, a learned class token in front, learned positions, pre-norm
blocks with non-causal self-attention, and a linear head on the class token's final state.
"""
from dataclasses import dataclass

import torch
from torch import nn

from ..nn import LearnedPositionalEncoding, TransformerBlock


@dataclass
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    mlp_ratio: int = 4
    dropout: float = 0.0

    @property
    def n_patches(self):
        return (self.image_size // self.patch_size) ** 2


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig, backend="auto"):
        super().__init__()
        if cfg.image_size % cfg.patch_size != 0:
            raise ValueError(f"image_size ({cfg.image_size}) must be a multiple of patch_size ({cfg.patch_size})")
        self.cfg = cfg
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.d_model, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.d_model))
        self.positions = LearnedPositionalEncoding(cfg.d_model, cfg.n_patches + 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.d_model, cfg.n_heads, cfg.mlp_ratio * cfg.d_model, causal=False, dropout=cfg.dropout,
                backend=backend,
            )
            for _ in range(cfg.n_layers)
        )
        self.ln_final = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.num_classes)
        nn.init.normal_(self.class_token, std=0.02)
        nn.init.normal_(self.positions.embedding.weight, std=0.02)

    def forward(self, images):
        """images: (B, in_channels, image_size, image_size). Returns class logits (B, num_classes)."""
        patches = self.patch_embed(images).flatten(2).transpose(1, 2)  # (B, n_patches, d_model)
        class_token = self.class_token.expand(patches.shape[0], -1, -1)  # (B, 1, d_model)
        x = self.dropout(self.positions(torch.cat([class_token, patches], dim=1)))  # (B, 1 + n_patches, d_model)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_final(x[:, 0]))
