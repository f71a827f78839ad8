"""What a benchmark times: the attention shapes (configs), their FLOPs, and the inputs each provider takes.

``grid``: q, k, v of one shape (the FlashAttention paper's sweep). ``gqa``: grouped-query heads, k and
v with fewer heads than q. ``varlen``: a batch of sequences of mixed lengths, which our kernels take
packed (flash-attn's layout) and everyone else as a padded batch with a mask. The score options of
issue 11, one case each (the case set ``options``): ``window`` (a sliding window), ``softcap``,
``alibi`` and ``dropout``, which our kernels and the naive attention take as arguments and torch's
SDPA as the equivalent explicit mask or bias (or its own dropout).
"""
from dataclasses import dataclass

import torch

import attention

from .flops import attention_flops, windowed_attention_flops

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
OPTIONS = ("window", "softcap", "alibi", "dropout")
CASES = ("grid", "gqa", "varlen", *OPTIONS)
# Names --cases takes for several cases at once.
CASE_SETS = {"options": OPTIONS}

# The options' values: Gemma-2's softcap of the attention scores, BERT's attention dropout; the
# dropout seed is fixed, so that every run draws the same keep-mask (offset 0: a seed given).
SOFTCAP = 50.0
DROPOUT_P = 0.1
DROPOUT_SEED = 0

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
    option: str | None = None  # one of OPTIONS: the score option this config times
    window: int | None = None  # the window option's left bound L: window (L, 0) when causal, else (L, L)

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        if self.option is not None and self.option not in OPTIONS:
            raise ValueError(f"option must be one of {OPTIONS}, got {self.option!r}")
        if (self.option == "window") != (self.window is not None) or (self.window is not None and self.window < 0):
            raise ValueError(f"a window (L >= 0) is given with the window option only, got option {self.option!r}, "
                             f"window {self.window!r}")

    @property
    def case(self):
        if self.option is not None:
            return self.option
        if self.lengths is not None:
            return "varlen"
        return "gqa" if self.kv_heads != self.heads else "grid"

    @property
    def window_bounds(self):
        """(left, right) of the window option, the public API's ``window``: right 0 (causal) or L."""
        return self.window, 0 if self.causal else self.window

    def flops(self, mode):
        """Real work only: a varlen batch counts each sequence at its own length, never the padding,
        so that every provider of the case, padded or packed, is scored on the same work; a window
        counts the (query, key) pairs it lets through."""
        if self.lengths is not None:
            return sum(attention_flops(1, self.heads, n, n, self.head_dim, self.causal, mode) for n in self.lengths)
        if self.option == "window":
            return windowed_attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim,
                                            self.window_bounds, mode)
        return attention_flops(self.batch, self.heads, self.seqlen, self.seqlen, self.head_dim, self.causal, mode)

    def shape(self):
        """The shape in a few words, for progress lines."""
        heads = f"H={self.heads}" + (f"/{self.kv_heads}" if self.kv_heads != self.heads else "")
        lengths = f" lengths={min(self.lengths)}..{max(self.lengths)}" if self.lengths else ""
        window = f" window={self.window_bounds}" if self.option == "window" else ""
        return f"B={self.batch} {heads} N={self.seqlen} d={self.head_dim}{lengths}{window}"


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


def option_grid(option, seqlens, head_dims, dtypes, causals, tokens, hidden, window=None):
    """One score option at batch * seqlen = ``tokens``, heads * head_dim = ``hidden``; ``window``: the
    window option's L."""
    return [
        Config(max(1, tokens // n), max(1, hidden // d), n, d, causal, dtype, option=option,
               window=window if option == "window" else None)
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
    if case in OPTIONS:
        return Config(1, 2, 16, head_dim, causal, dtype, option=case, window=4 if case == "window" else None)
    return Config(1, 2, 16, head_dim, causal, dtype)


def alibi_slopes(heads, device):
    """ALiBi's per-head slopes (Press et al.): 2^(-8h/H) for head h = 1..H, float32 (H,)."""
    return torch.exp2(-8.0 * torch.arange(1, heads + 1, device=device, dtype=torch.float32) / heads)


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
# option-ours:  dense, with the config's option as flash_attention's keyword arguments: window, softcap,
#           alibi_slopes (H,), or dropout_p with dropout_seed
# option-naive: dense, with naive_attention's: the same, but dropout_p with the keep-mask of that seed
#           (attention.dropout_mask, made before timing: the mask our kernels draw inside)
# option-sdpa:  dense, with SDPA's equivalent: window, a bool attn_mask (N, N), True inside the window;
#           alibi, a float attn_mask (1, H, N, N) in q's dtype, -slope * |i - j|, -inf above the
#           diagonal when causal; dropout, dropout_p (torch draws its own mask). Softcap has none.
FORMS = ("dense", "expanded", "packed", "padded", "sdpa-mask", "option-ours", "option-naive", "option-sdpa")


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
    if form.startswith("option-"):
        q, k, v = make_inputs(config, device, requires_grad)
        return q, k, v, option_arguments(config, form, q)
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


def _key_offsets(n_q, n_k, device):
    """(Nq, Nk) int: j - (i + shift), shift = Nk - Nq: where key j lies from query i's own position
    (bottom-right aligned, as the API aligns causal masks and windows)."""
    return torch.arange(n_k, device=device)[None, :] - torch.arange(n_q, device=device)[:, None] - (n_k - n_q)


def window_mask(n_q, n_k, window, device):
    """Bool (Nq, Nk), True where query i sees key j under ``window`` (left, right), -1 unbounded:
    i + shift - left <= j <= i + shift + right."""
    left, right = window
    offsets = _key_offsets(n_q, n_k, device)
    visible = torch.ones(n_q, n_k, device=device, dtype=torch.bool)
    if left >= 0:
        visible &= offsets >= -left
    if right >= 0:
        visible &= offsets <= right
    return visible


def alibi_bias(slopes, n_q, n_k, causal, dtype):
    """ALiBi as an additive float bias (1, H, Nq, Nk) in ``dtype``: -slope_h * |i + shift - j|, and -inf
    where a causal query does not see the key (SDPA takes a float mask or is_causal, not both)."""
    bias = -slopes[:, None, None] * _key_offsets(n_q, n_k, slopes.device).abs().float()
    if causal:
        bias = bias.masked_fill(~window_mask(n_q, n_k, (-1, 0), slopes.device), float("-inf"))
    return bias[None].to(dtype)


def option_arguments(config, form, q):
    """The keyword arguments that give a provider of ``form`` the config's option (see FORMS)."""
    n, device = config.seqlen, q.device
    if config.option == "window":
        if form == "option-sdpa":
            return {"attn_mask": window_mask(n, n, config.window_bounds, device)}
        return {"window": config.window_bounds}
    if config.option == "softcap":
        if form == "option-sdpa":
            raise ValueError("torch's scaled_dot_product_attention has no softcap")
        return {"softcap": SOFTCAP}
    if config.option == "alibi":
        slopes = alibi_slopes(config.heads, device)
        if form == "option-sdpa":
            return {"attn_mask": alibi_bias(slopes, n, n, config.causal, q.dtype)}
        return {"alibi_slopes": slopes}
    if config.option == "dropout":
        if form == "option-ours":
            return {"dropout_p": DROPOUT_P, "dropout_seed": DROPOUT_SEED}
        if form == "option-naive":
            mask = attention.dropout_mask(DROPOUT_P, DROPOUT_SEED, 0, config.batch, config.heads, n, n, device)
            return {"dropout_p": DROPOUT_P, "dropout_mask": mask}
        return {"dropout_p": DROPOUT_P}
    raise ValueError(f"config {config} has no option (one of {OPTIONS})")
