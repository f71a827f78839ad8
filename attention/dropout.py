"""The dropout keep-mask every backend draws: Philox4x32-10 (Salmon et al., SC'11), a counter-based generator.

A kept entry is a pure function of (seed, offset, batch b, query head h, query i, key j), so the backward
regenerates the forward's mask instead of storing it, and every backend draws the same one:
- key (seed & 0xffffffff, seed >> 32); counter (j >> 2, i, b * H + h, offset), H the number of query heads;
- one Philox call gives the four words of keys 4g .. 4g + 3 of a row; key j takes word j & 3;
- the entry is kept iff its word >= floor(dropout_p * 2^32).
This module is the reference (plain torch, int64 arithmetic); the kernels implement the same function.
"""
import torch

PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF
_MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
_KEY_BUMPS = (0x9E3779B9, 0xBB67AE85)


def _mulhilo(a, b):
    # a, b < 2^32: the product wraps modulo 2^64 in int64, which keeps both halves exact.
    product = a * b
    return (product >> 32) & _MASK32, product & _MASK32


def philox4x32(counter, key, rounds=PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values: counter (c0, c1, c2, c3), key (k0, k1), all
    broadcastable. Returns the four output words."""
    c0, c1, c2, c3 = (torch.as_tensor(c, dtype=torch.int64) & _MASK32 for c in counter)
    k0, k1 = (torch.as_tensor(k, dtype=torch.int64, device=c0.device) & _MASK32 for k in key)
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, _MULTIPLIERS[0])
        hi1, lo1 = _mulhilo(c2, _MULTIPLIERS[1])
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _KEY_BUMPS[0]) & _MASK32, (k1 + _KEY_BUMPS[1]) & _MASK32
    return c0, c1, c2, c3


def keep_threshold(dropout_p):
    """The smallest kept word: floor(dropout_p * 2^32), computed in double as the kernels do."""
    return int(dropout_p * 4294967296.0)


def dropout_mask(dropout_p, seed, offset, batch, heads, seqlen_q, seqlen_k, device=None):
    """Bool (batch, heads, seqlen_q, seqlen_k), True where an attention probability is kept (scaled by
    1 / (1 - dropout_p)): the mask ``flash_attention(..., dropout_p=, dropout_seed=seed)`` applies
    (offset 0 when the seed is given), in every backend. For varlen calls, sequence b's mask is
    ``mask[b, :, :len_q, :len_k]`` of a mask sized by the longest sequences."""
    b = torch.arange(batch, device=device, dtype=torch.int64)[:, None, None, None]
    h = torch.arange(heads, device=device, dtype=torch.int64)[None, :, None, None]
    i = torch.arange(seqlen_q, device=device, dtype=torch.int64)[None, None, :, None]
    j = torch.arange(seqlen_k, device=device, dtype=torch.int64)[None, None, None, :]
    groups = torch.arange((seqlen_k + 3) // 4, device=device, dtype=torch.int64)
    words = philox4x32((groups, i, b * heads + h, offset), (seed & _MASK32, (seed >> 32) & _MASK32))
    words = torch.stack(torch.broadcast_tensors(*words), dim=-1)  # (B, H, Nq, groups, 4)
    words = words.flatten(-2)[..., :seqlen_k]  # key j takes word j & 3 of group j >> 2
    return words >= keep_threshold(dropout_p)
