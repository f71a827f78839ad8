"""Reference models on our attention kernels: the encoder-decoder Transformer, GPT and ViT.

Each takes ``backend=`` for all its attention layers; ``set_backend(model, name)`` switches them later.
"""
from ..nn import set_backend
from .gpt import GPT, GPTConfig
from .transformer import Transformer, TransformerConfig
from .vit import ViT, ViTConfig

__all__ = ["GPT", "GPTConfig", "Transformer", "TransformerConfig", "ViT", "ViTConfig", "set_backend"]
