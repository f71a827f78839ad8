"""fused-attention: fused, flash-style attention kernels (Triton, CUDA C++, C++ CPU) as torch ops."""
from .api import explain, explain_sdpa, flash_attention, flash_attention_varlen, scaled_dot_product_attention
from .backends import BACKENDS, available_backends
from .dropout import dropout_mask
from .reference import naive_attention

__all__ = [
    "BACKENDS",
    "available_backends",
    "dropout_mask",
    "explain",
    "explain_sdpa",
    "flash_attention",
    "flash_attention_varlen",
    "naive_attention",
    "scaled_dot_product_attention",
]
__version__ = "0.1.0"
