"""Checks every public call makes once, before any backend runs: each error names the argument."""
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def validate_inputs(q, k, v, softmax_scale=None):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have rank 4 (batch, heads, seq_len, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must share a device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: all inputs must share a dtype")
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(
                f"{name} has (batch, heads) {tuple(t.shape[:2])} but q has {tuple(q.shape[:2])}: they must match"
            )
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} keys (dim 2) but k has {k.shape[2]}: they must match")
    for name, t in (("k", k), ("v", v)):
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{name} has head_dim {t.shape[3]} but q has {q.shape[3]}: head dims must be equal")
    if not 1 <= q.shape[3] <= MAX_HEAD_DIM:
        raise ValueError(f"q has head_dim {q.shape[3]}: supported head dims are 1..{MAX_HEAD_DIM}")
    if softmax_scale is not None:
        if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
            raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
        if not softmax_scale == softmax_scale or softmax_scale in (float("inf"), float("-inf")):
            raise ValueError(f"softmax_scale must be finite, got {softmax_scale}")
