"""Merging attention computed over disjoint parts of the key axis, by their log-sum-exp.

Split-KV decoding (each program attends to one chunk of the cache) and ring attention (each rank
attends to the K/V shard in hand) both end with partial results (o_s, lse_s) over key sets that
partition the keys. Softmax over the union is the lse-weighted mean of the parts:
    lse = log Σ_s exp(lse_s),    o = Σ_s exp(lse_s - lse) · o_s.
A part that saw no key has lse_s = -inf and weight 0; if every part is empty, o = 0 and lse = -inf,
as for a fully masked row.
"""
import torch


def merge_partials(o_parts, lse_parts):
    """(o, lse) of attention over the union of S disjoint key sets, from each set's result.

    o_parts (S, ..., N, D) and lse_parts (S, ..., N): part s attended to its own keys, o_s normalised
    over them (finite; 0 where the part saw no key) and lse_s their log-sum-exp (-inf: no key). Returns
    o (..., N, D) in float32 and lse (..., N) in float32. Differentiable in both (ring attention's
    backward goes through it); one part is returned as it is, in float32.
    """
    if o_parts.shape[:-1] != lse_parts.shape:
        raise ValueError(f"o_parts {tuple(o_parts.shape)} and lse_parts {tuple(lse_parts.shape)} must agree on "
                         f"(parts, ..., N)")
    o_parts, lse_parts = o_parts.float(), lse_parts.float()
    if o_parts.shape[0] == 1:
        return o_parts[0], lse_parts[0]
    lse_max = lse_parts.amax(dim=0)
    # Rows no part saw: shift by 0 instead of -inf, so every weight is exp(-inf) = 0 and nothing is NaN.
    lse_max = torch.where(lse_max.isneginf(), torch.zeros_like(lse_max), lse_max)
    weights = torch.exp(lse_parts - lse_max)  # (S, ..., N), 0 for empty parts
    total = weights.sum(dim=0)
    lse = lse_max + torch.log(total)  # -inf where total is 0
    o = (weights.unsqueeze(-1) * o_parts).sum(dim=0) / total.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    return o, lse


def merge_two(o_a, lse_a, o_b, lse_b):
    """merge_partials of two parts given separately, the running merge of a ring step: the same formula
    without stacking the parts, so it allocates the merged o and row-sized temporaries only."""
    lse = torch.logaddexp(lse_a.float(), lse_b.float())  # -inf where neither part saw a key
    shift = torch.where(lse.isneginf(), torch.zeros_like(lse), lse)
    w_a, w_b = (torch.exp(part.float() - shift).unsqueeze(-1) for part in (lse_a, lse_b))
    return torch.addcmul(w_a * o_a.float(), w_b, o_b.float()), lse
