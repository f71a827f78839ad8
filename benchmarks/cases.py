"""What a benchmark times: the attention shapes (configs), their FLOPs, and the inputs each provider takes.

Three cases. ``grid``: q, k, v of one shape (the FlashAttention paper's sweep). ``gqa``: grouped-query
heads, k and v with fewer heads than q. ``varlen``: a batch of sequences of mixed lengths, which our
kernels take packed (flash-attn's layout) and everyone else as a padded batch with a mask.
"""
from dataclasses import dataclass

import torch

from .flops import attention_flops

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
CASES = ("grid", "gqa", "varlen")

# Varlen batches draw their lengths with this seed, so every run and provider times the same batch.
VARLEN_SEED = 0


@dataclass(frozen=True)
class Config:
    """One attention shape: q (batch, heads, seqlen, head_dim), k and v (batch, kv_heads, seqlen, head_dim).

    ``lengths`` (varlen only): the real length of each of the ``batch`` sequences; ``seqlen`` is the
    longest, the width of the padded batch. Every sequence has as many queries as keys.
    """

    batch: int
    heads: int
    seqlen: int
    head_dim: int
    causal: bool
    dtype: str  # a key of DTYPES
    kv_heads: int | None = None  # None: as many as heads
    lengths: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)

    @property
    def case(self):
        if self.lengths is not None:
            return "varlen"
        return "gqa" if self.kv_heads != self.heads else "grid"

    def flops(self, mode):
        """Real work only: a varlen batch counts each sequence at its own length, never the padding,
        so that every provider of the case, padded or packed, is scored on the same work."""
        if self.lengths is not None:
            return sum(attention_flops(1, self.heads, n, n, self.head_dim, self.causal, mode) for n in self.lengths)
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, self.causal, mode)

    def shape(self):
        """The shape in a few words, for progress lines."""
        heads = f"H={self.heads}" + (f"/{self.kv_heads}" if self.kv_heads != self.heads else "")
        lengths = f" lengths={min(self.lengths)}..{max(self.lengths)}" if self.lengths else ""
        return f"B={self.batch} {heads} N={self.seqlen} d={self.head_dim}{lengths}"


def token_budget_grid(seqlens, head_dims, dtypes, causals, tokens, hidden):
    """The FlashAttention paper's sweep: batch * seqlen = ``tokens``, heads * head_dim = ``hidden``."""
    return [
        Config(max(1, tokens // n), max(1, hidden // d), n, d, causal, dtype)
        for dtype in dtypes
        for causal in causals
        for d in head_dims
        for n in seqlens
    ]


def gqa_grid(seqlens, head_dims, dtypes, causals, tokens, heads, kv_heads):
    """Grouped-query heads (Llama-3-8B: 32 query heads, 8 KV heads), batch * seqlen = ``tokens``."""
    return [
        Config(max(1, tokens // n), heads, n, d, causal, dtype, kv_heads=kv_heads)
        for dtype in dtypes
        for causal in causals
        for d in head_dims
        for n in seqlens
    ]


def varlen_lengths(batch, seqlen, seed=VARLEN_SEED):
    """``batch`` lengths drawn uniformly from [seqlen / 8, seqlen], the longest set to ``seqlen``."""
    generator = torch.Generator().manual_seed(seed + seqlen)
    lengths = torch.randint(max(1, seqlen // 8), seqlen + 1, (batch,), generator=generator)
    lengths[lengths.argmax()] = seqlen
    return tuple(lengths.tolist())


def varlen_grid(seqlens, head_dims, dtypes, causals, tokens, hidden):
    """Mixed-length batches of batch = ``tokens`` / N sequences, N the longest, heads * head_dim = ``hidden``."""
    return [
        Config(max(1, tokens // n), max(1, hidden // d), n, d, causal, dtype,
               lengths=varlen_lengths(max(1, tokens // n), n))
        for dtype in dtypes
        for causal in causals
        for d in head_dims
        for n in seqlens
    ]


def probe_config(case, dtype, head_dim, causal):
    """A tiny config of ``case``, for a provider to find out whether it can run the case at all."""
    if case == "gqa":
        return Config(1, 4, 16, head_dim, causal, dtype, kv_heads=1)
    if case == "varlen":
        return Config(2, 2, 16, head_dim, causal, dtype, lengths=(16, 5))
    return Config(1, 2, 16, head_dim, causal, dtype)


# ---- the inputs, in the form each provider takes -------------------------------------------------

# dense:    q (B, H, N, D), k and v (B, Hkv, N, D)
# expanded: as dense, k and v repeated to H heads (repeat_interleave: query head h reads KV head
#           h // (H / Hkv)), as tensors of their own, so the copy is made before any timing
# packed:   q (total, H, D), k and v (total, Hkv, D), the sequences one after another; cu_seqlens
#           int32 (B + 1,) and max_seqlen
# padded:   dense, sequence b's rows from lengths[b] on are padding; key_padding_mask bool (B, N),
#           True where the key is real
# sdpa-mask: padded, with SDPA's boolean attn_mask (True: take part) instead: (B, 1, 1, N), or for
#           causal (B, 1, N, N), padding and the causal triangle in one mask (SDPA takes one or the other)
FORMS = ("dense", "expanded", "packed", "padded", "sdpa-mask")


def make_inputs(config, device, requires_grad):
    """q, k, v of a dense config, random normal."""
    dtype = DTYPES[config.dtype]
    q = torch.randn(config.batch, config.heads, config.seqlen, config.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(config.batch, config.kv_heads, config.seqlen, config.head_dim, device=device, dtype=dtype)
            for _ in range(2))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _packed(config, device):
    dtype, total = DTYPES[config.dtype], sum(config.lengths)
    q = torch.randn(total, config.heads, config.head_dim, device=device, dtype=dtype)
    k, v = (torch.randn(total, config.kv_heads, config.head_dim, device=device, dtype=dtype) for _ in range(2))
    return q, k, v


def _padded(t, lengths, width):
    """A packed (total, H, D) tensor as a padded (B, H, width, D) batch; the padding is random, as real
    padding tokens' projections are not zero either."""
    batch = t.new_empty(len(lengths), width, *t.shape[1:]).normal_()
    for b, sequence in enumerate(t.split(list(lengths))):
        batch[b, : len(sequence)] = sequence
    return batch.transpose(1, 2).contiguous()


def key_padding_mask(lengths, width, device):
    """Bool (B, width), True where the key is real: each sequence at the start, the padding after it."""
    return torch.arange(width, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


def case_inputs(config, form, device, requires_grad):
    """(q, k, v, extra keyword arguments) of ``config`` in ``form``; q, k, v require grad when asked.

    The packed and padded forms are built from the same draws, so that the same random seed gives
    every provider of a varlen case the same sequences.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if form in ("dense", "expanded"):
        q, k, v = make_inputs(config, device, requires_grad=False)
        if form == "expanded":
            group = config.heads // config.kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return (*(t.requires_grad_(requires_grad) for t in (q, k, v)), {})
    q, k, v = _packed(config, device)
    if form == "packed":
        cu_seqlens = torch.tensor([0, *torch.tensor(config.lengths).cumsum(0).tolist()], device=device,
                                  dtype=torch.int32)
        return (*(t.requires_grad_(requires_grad) for t in (q, k, v)),
                {"cu_seqlens": cu_seqlens, "max_seqlen": max(config.lengths)})
    q, k, v = (_padded(t, config.lengths, config.seqlen).requires_grad_(requires_grad) for t in (q, k, v))
    mask = key_padding_mask(config.lengths, config.seqlen, device)
    if form == "padded":
        return q, k, v, {"key_padding_mask": mask}
    attn_mask = mask[:, None, None, :]
    if config.causal:  # Nq == Nk: the triangle is the same aligned top-left (SDPA) or bottom-right (ours)
        attn_mask = attn_mask & torch.ones(config.seqlen, config.seqlen, device=device, dtype=torch.bool).tril()
    return q, k, v, {"attn_mask": attn_mask}
