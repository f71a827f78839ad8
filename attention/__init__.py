"""fused-attention: fused, flash-style attention kernels (Triton, CUDA C++, C++ CPU) as torch ops."""
from . import distributed
from .api import explain, flash_attention, flash_attention_varlen
from .backends import BACKENDS, available_backends
from .dropout import dropout_mask
from .kvcache import flash_attention_with_kvcache
from .reference import naive_attention
from .sdpa import SdpaStats, explain_sdpa, patch_torch_sdpa, scaled_dot_product_attention

__all__ = [
    "BACKENDS",
    "SdpaStats",
    "available_backends",
    "dropout_mask",
    "explain",
    "explain_sdpa",
    "flash_attention",
    "flash_attention_with_kvcache",
    "flash_attention_varlen",
    "naive_attention",
    "patch_torch_sdpa",
    "scaled_dot_product_attention",
]
__version__ = "0.1.0"
