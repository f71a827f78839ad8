"""Checks every public call makes once, before any backend runs: each error names the argument.

The checks end in one frozen ``AttentionOptions`` that dispatch, ``explain`` and the ops read.
"""
import math
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256

# The argument names of flash_attention, and those of torch's SDPA for its drop-in.
FLASH_NAMES = dict(q="q", k="k", v="v", scale="softmax_scale")
SDPA_NAMES = dict(q="query", k="key", v="value", scale="scale")


@dataclass(frozen=True)
class AttentionOptions:
    """One call's options, checked. Dense calls leave the cu_seqlens None; varlen calls (flash-attn's
    packed layout, seen by the kernels as 4-D (1, H, total, D) views) leave key_padding_mask None."""

    causal: bool
    softmax_scale: float
    key_padding_mask: torch.Tensor | None = None  # contiguous bool (B, Nk), True where the key is real
    cu_seqlens_q: torch.Tensor | None = None  # int32 (B + 1,)
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    deterministic: bool = True
    # Score modifiers, as flash_attention's docstring gives them. Causal is a window ending at the
    # diagonal: __post_init__ makes causal and window_right == 0 the same, so kernels may take either.
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: torch.Tensor | None = None  # contiguous float32 (B, Hq), B the sequences when varlen
    dropout_p: float = 0.0
    dropout_seed: int = 0
    dropout_offset: int = 0

    def __post_init__(self):
        if self.causal:
            object.__setattr__(self, "window_right", 0)
        object.__setattr__(self, "causal", self.window_right == 0)

    @property
    def varlen(self):
        return self.cu_seqlens_q is not None

    def op_args(self):
        """The arguments after (q, k, v) of every fused forward op, as csrc/ops.cpp declares them."""
        return (self.causal, self.softmax_scale, self.key_padding_mask, self.cu_seqlens_q, self.cu_seqlens_k,
                self.max_seqlen_q, self.max_seqlen_k, self.window_left, self.window_right, self.softcap,
                self.alibi_slopes, self.dropout_p, self.dropout_seed, self.dropout_offset)

    def decode_args(self):
        """The arguments of every fwd_kvcache op between (q, k_cache, v_cache, seqlens_k, block_table) and num_splits."""
        return (self.causal, self.softmax_scale, self.window_left, self.window_right, self.softcap, self.alibi_slopes)

    @property
    def window(self):
        return (self.window_left, self.window_right)


def check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def resolve_scale(softmax_scale, scale, head_dim, name="softmax_scale"):
    """The scale to use: ``softmax_scale`` or its alias ``scale`` (SDPA's name), 1/sqrt(head_dim) if neither."""
    if scale is not None:
        if softmax_scale is not None and softmax_scale != scale:
            raise ValueError(f"softmax_scale={softmax_scale} and scale={scale} disagree: give one of them")
        softmax_scale, name = scale, "scale"
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(softmax_scale).__name__}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"{name} must be finite, got {softmax_scale}")
    return float(softmax_scale)


def validate_inputs(q, k, v, names=FLASH_NAMES, rank=4):
    """q (B, Hq, Nq, D), k and v (B, Hkv, Nk, D) with Hq a multiple of Hkv; rank 3 (total, H, D) for varlen."""
    layout = "(batch, heads, seq_len, head_dim)" if rank == 4 else "(total_tokens, heads, head_dim)"
    qn, kn, vn = names["q"], names["k"], names["v"]
    for name, t in ((qn, q), (kn, k), (vn, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise TypeError(f"{name} is a nested tensor: pack the sequences for flash_attention_varlen instead")
        if t.dim() != rank:
            raise ValueError(f"{name} must have rank {rank} {layout}, got shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
    for name, t in ((kn, k), (vn, v)):
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but {qn} is on {q.device}: all inputs must share a device")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {qn} has {q.dtype}: all inputs must share a dtype")
        if rank == 4 and t.shape[0] != q.shape[0]:
            raise ValueError(f"{name} has batch {t.shape[0]} but {qn} has {q.shape[0]}: they must match")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"{vn} has {v.shape[1]} heads but {kn} has {k.shape[1]}: they must match")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"{qn} has {q.shape[1]} heads, not a multiple of the {k.shape[1]} heads of {kn} "
                         f"(grouped-query attention: query heads = group size x key heads)")
    seq_dim, what = (2, "keys (dim 2)") if rank == 4 else (0, "tokens (dim 0)")
    if v.shape[seq_dim] != k.shape[seq_dim]:
        raise ValueError(f"{vn} has {v.shape[seq_dim]} {what} but {kn} has {k.shape[seq_dim]}: they must match")
    for name, t in ((kn, k), (vn, v)):
        if t.shape[-1] != q.shape[-1]:
            raise ValueError(f"{name} has head_dim {t.shape[-1]} but {qn} has {q.shape[-1]}: head dims must be equal")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"{qn} has head_dim {q.shape[-1]}: supported head dims are 1..{MAX_HEAD_DIM}")


def validate_key_padding_mask(mask, q, k, name="key_padding_mask"):
    """A bool (B, Nk) tensor on q's device, True where the key is real; returned contiguous."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True where the key is real), got {mask.dtype}")
    expected = (q.shape[0], k.shape[2])
    if tuple(mask.shape) != expected:
        raise ValueError(f"{name} must have shape (batch, Nk) = {expected}, got {tuple(mask.shape)}")
    if mask.device != q.device:
        raise ValueError(f"{name} is on {mask.device} but q is on {q.device}: all inputs must share a device")
    return mask.contiguous()


def validate_cu_seqlens(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q, k):
    """int32 (B + 1,) offsets on q's device, from 0, non-decreasing, ending at the token count; the max
    lengths at least the longest sequence. Reads the offsets on the host (one small copy) unless traced."""
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]), ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}: all inputs must share a device")
        if cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must have shape (batch + 1,), got {tuple(cu.shape)}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries but cu_seqlens_k has "
                         f"{cu_seqlens_k.numel()}: both are (batch + 1,)")
    for name, value in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise TypeError(f"{name} must be a non-negative int, got {value!r}")
    if torch.compiler.is_compiling():  # values are data: checking them would break the graph
        return
    for name, cu, total, max_name, max_len in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], "max_seqlen_q", max_seqlen_q),
                                                ("cu_seqlens_k", cu_seqlens_k, k.shape[0], "max_seqlen_k", max_seqlen_k)):
        bounds = cu.tolist()
        lengths = [end - start for start, end in zip(bounds, bounds[1:])]
        if bounds[0] != 0:
            raise ValueError(f"{name} must start at 0, got {bounds[0]}")
        if any(n < 0 for n in lengths):
            raise ValueError(f"{name} must be non-decreasing, got {bounds}")
        if bounds[-1] != total:
            raise ValueError(f"{name} ends at {bounds[-1]} but there are {total} tokens: the last entry must be "
                             f"the total")
        if lengths and max(lengths) > max_len:
            raise ValueError(f"{max_name}={max_len} is below the longest sequence in {name} ({max(lengths)})")


def _check_int(name, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low or (high is not None and value >= high):
        bound = f">= {low}" if high is None else f"in [{low}, {high})"
        raise ValueError(f"{name} must be {bound}, got {value}")


def validate_window(window):
    """(left, right), -1 for an unbounded side."""
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be a pair (left, right), got {window!r}")
    for name, bound in zip(("window[0] (left)", "window[1] (right)"), window):
        _check_int(name, bound, -1)
    return tuple(window)


def validate_softcap(softcap):
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be finite and >= 0 (0: off), got {softcap}")
    return float(softcap)


def validate_alibi_slopes(slopes, batch, heads, device):
    """float32 (Hq,) or (B, Hq) on q's device; returned as a contiguous (B, Hq) tensor."""
    if slopes is None:
        return None
    if not isinstance(slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(slopes).__name__}")
    if slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {slopes.dtype}")
    if tuple(slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape (heads,) = ({heads},) or (batch, heads) = ({batch}, {heads}), "
                         f"got {tuple(slopes.shape)}")
    if slopes.device != device:
        raise ValueError(f"alibi_slopes is on {slopes.device} but q is on {device}: all inputs must share a device")
    return slopes.expand(batch, heads).contiguous()


def validate_dropout(dropout_p, dropout_seed):
    """(dropout_p, seed, offset). Without a seed, both are drawn from torch's default CPU generator (so
    torch.manual_seed reproduces a run; under torch.compile that draw is a graph break: give a seed)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_seed is not None:
        _check_int("dropout_seed", dropout_seed, 0, 2**63)
    if dropout_p == 0.0:
        return 0.0, 0, 0
    if dropout_seed is not None:
        return float(dropout_p), dropout_seed, 0
    seed = int(torch.randint(0, 2**63 - 1, ()))
    offset = int(torch.randint(0, 2**32, ()))
    return float(dropout_p), seed, offset


def _check_tensor(name, t, q, rank=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != q.device:
        raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all inputs must share a device")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {tuple(t.shape)}")


def validate_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table):
    """The shapes, dtypes and devices of a flash_attention_with_kvcache call (see its docstring); returns
    cache_seqlens as an int32 (B,) tensor on q's device. Reads no values: see check_kvcache_values."""
    validate_inputs(q, q, q)
    batch, q_heads, _, head_dim = q.shape
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        _check_tensor(name, cache, q, rank=4)
        if cache.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {cache.dtype} but q has {q.dtype}: all inputs must share a dtype")
        if cache.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim: it is written and read in place")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache has shape {tuple(v_cache.shape)} but k_cache has {tuple(k_cache.shape)}: they must match")
    kv_heads = k_cache.shape[1]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache has head_dim {k_cache.shape[3]} but q has {head_dim}: head dims must be equal")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(f"q has {q_heads} heads, not a multiple of the {kv_heads} heads of k_cache "
                         f"(grouped-query attention: query heads = group size x key heads)")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"k_cache has batch {k_cache.shape[0]} but q has {batch}: a dense cache is "
                             f"(batch, kv_heads, max_seqlen, head_dim) (give block_table for a paged one)")
    else:
        _check_tensor("block_table", block_table, q, rank=2)
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must be int32, got {block_table.dtype}")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have shape (batch, max_blocks) with batch {batch}, "
                             f"got {tuple(block_table.shape)}")
        if k_cache.shape[2] == 0:
            raise ValueError("k_cache has block_size 0: a paged cache is (num_blocks, kv_heads, block_size, head_dim)")
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    if k_new is not None:
        for name, new in (("k_new", k_new), ("v_new", v_new)):
            _check_tensor(name, new, q, rank=4)
            if new.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {new.dtype} but q has {q.dtype}: all inputs must share a dtype")
            expected = (batch, kv_heads, k_new.shape[2], head_dim)
            if tuple(new.shape) != expected:
                raise ValueError(f"{name} must have shape (batch, kv_heads, n_new, head_dim) = {expected}, "
                                 f"got {tuple(new.shape)}")
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    _check_tensor("cache_seqlens", cache_seqlens, q, rank=1)
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"cache_seqlens must be int32 (or an int), got {cache_seqlens.dtype}")
    if cache_seqlens.shape[0] != batch:
        raise ValueError(f"cache_seqlens must have shape (batch,) = ({batch},), got {tuple(cache_seqlens.shape)}")
    return cache_seqlens.contiguous()


def check_kvcache_values(cache_seqlens, n_new, capacity, block_table=None, block_size=0, num_blocks=0):
    """The values a kvcache call depends on: 0 <= cache_seqlens, cache_seqlens + n_new <= capacity (the keys a
    sequence's cache can hold), the block-table entries the call touches within [0, num_blocks). Reads the
    tensors on the host: the caller runs it for CPU tensors, or under FUSED_ATTENTION_DEBUG=1."""
    lengths = cache_seqlens.tolist()
    if min(lengths, default=0) < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {lengths}")
    if max(lengths, default=0) + n_new > capacity:
        b = max(range(len(lengths)), key=lengths.__getitem__)
        raise ValueError(f"cache_seqlens[{b}] = {lengths[b]} plus {n_new} new keys exceeds the cache's {capacity} "
                         f"positions")
    if block_table is None:
        return
    for b, length in enumerate(lengths):
        used = block_table[b, :-(-(length + n_new) // block_size)]
        bad = ((used < 0) | (used >= num_blocks)).nonzero()
        if bad.numel():
            j = bad[0, 0].item()
            raise ValueError(f"block_table[{b}, {j}] = {used[j].item()} is outside the cache's {num_blocks} blocks")
