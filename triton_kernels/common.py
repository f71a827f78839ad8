"""Pieces shared by the forward and backward kernels: tile loads, which keys a query sees (causal, sliding
window, key padding, varlen sequences), the score modifications (softcap, ALiBi), the dropout keep-mask,
config rules."""
import copy
import functools
import math
import os
import warnings

import torch
import triton
import triton.language as tl

# The interpreter runs each program as numpy code on the CPU: big tiles only make it slower.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# tl.constexpr so that kernels may read them (plain globals are refused by the compiler, not the interpreter).
LOG2E = tl.constexpr(1.0 / math.log(2.0))
LN2 = tl.constexpr(math.log(2.0))


def padded_head_dim(head_dim: int) -> int:
    """Tile width along the head dim: a power of two (tl.arange needs one) and at least 16 (tl.dot does)."""
    return max(16, triton.next_power_of_2(head_dim))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get true fp32 products ("ieee"), not TF32: whoever passes fp32 asks for fp32 accuracy.

    The price is speed: "ieee" dots run on CUDA cores, so fp32 is an accuracy path, not a fast one. The
    setting only affects fp32 operands; fp16/bf16 dots always run on tensor cores.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def make_configs(shapes):
    """triton.Configs from (BLOCK_M, BLOCK_N, num_warps, num_stages) tuples."""
    return [
        triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_m, block_n, warps, stages in shapes
    ]


def distinct(configs):
    """configs without repeats (the same tiles, warps and stages), in order: two kernels' lists may share some."""
    seen = {}
    for config in configs:
        seen.setdefault((tuple(sorted(config.kwargs.items())), config.num_warps, config.num_stages), config)
    return list(seen.values())


def n_bucket(n: int) -> int:
    """What the autotuner keys on for a length: its next power of two, so that tiles are tuned per length
    scale (20 buckets up to 2**20 tokens) without retuning and recompiling for every new length."""
    return triton.next_power_of_2(n)


@functools.cache
def _shared_memory_bytes(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


@functools.cache
def _arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return 10 * major + minor


def query_tile_shared_memory(config, block_d, element_bytes):
    """The shared memory of a kernel that holds one Q tile and streams K and V (forward, decode): K and V
    tiles for every pipeline stage plus the Q tile."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    tiles = 2 * config.num_stages * block_n * block_d + block_m * block_d
    return tiles * element_bytes


class KernelConfigs:
    """The autotune configs of one kernel: fp16/bf16 tiles per padded head dim, and fp32 tiles.

    tensor_core maps the largest padded head dim a list serves to its (BLOCK_M, BLOCK_N, num_warps,
    num_stages) tuples, with an optional fifth entry, the lowest architecture that keeps the config (90:
    Hopper only, where it spills on sm_80 or overflows its shared memory). Head dim 64 takes the list of
    64, head dim 80 that of 128. The compile gate (tests/test_triton_compile.py) holds every config, at its
    head dim, to no spills on sm_80 and sm_90 (where kept) and every dot a wgmma on sm_90;
    triton_kernels/RESOURCES.md lists their registers and shared memory. fp32 inputs get their own small
    tiles: "ieee" dots run on CUDA cores.
    shared_memory(config, block_d, element_bytes) estimates a config's shared memory; a TMA build takes
    tma_shared_memory(config, block_d) more (by default TMA_SHARED_BYTES, its barriers), an fp16/bf16
    build for sm_80 (mma.sync) mma_sync_shared_memory(config, block_d, element_bytes) more (by default 0).
    """

    def __init__(self, tensor_core, fp32, shared_memory, interpreter_shape, tma_shared_memory=None,
                 mma_sync_shared_memory=None):
        self.tensor_core = {
            head_dim: [(make_configs([shape[:4]])[0], shape[4] if len(shape) > 4 else 0) for shape in shapes]
            for head_dim, shapes in sorted(tensor_core.items())
        }
        self.fp32 = make_configs(fp32)
        self.shared_memory = shared_memory
        self.tma_shared_memory = tma_shared_memory or (lambda config, block_d: TMA_SHARED_BYTES)
        self.mma_sync_shared_memory = mma_sync_shared_memory or (lambda config, block_d, element_bytes: 0)
        # The interpreter runs each program as numpy code: one small tile, nothing to tune.
        self.interpreter_shape = interpreter_shape
        self.interpreter = make_configs([interpreter_shape])

    def with_shared_memory(self, shared_memory):
        """The same configs for a build of the kernel whose shared memory shared_memory estimates."""
        other = copy.copy(self)
        other.shared_memory = shared_memory
        return other

    def serves(self, block_d):
        """Whether some fp16/bf16 list serves this padded head dim."""
        return block_d <= max(self.tensor_core)

    def for_head_dim(self, block_d, arch=None):
        """The fp16/bf16 configs for a padded head dim kept on sm_<arch> (on any, if arch is None)."""
        kept = next(configs for head_dim, configs in self.tensor_core.items() if block_d <= head_dim)
        return [config for config, min_arch in kept if arch is None or arch >= min_arch]

    def all(self):
        """Every config the autotuner may pick from."""
        if INTERPRETING:
            return self.interpreter
        return [config for kept in self.tensor_core.values() for config, _ in kept] + self.fp32

    def prune(self, configs, named_args, **kwargs):
        """An autotune `early_config_prune`: the configs for the call's dtype, head dim and architecture
        whose shared memory fits the device; the smallest of them if none does. A config whose shared
        memory overflows would fail to compile and be skipped anyway; the estimate saves compiling it.

        During a CUDA-graph capture, only the first of them: the autotuner benchmarks no single config,
        and benchmarking launches would be recorded into the graph (or break the capture). That choice is
        cached for the call's key like a tuned one, so a call made once before capturing (a warm-up) is
        what gets the tuned config."""
        args = {**named_args, **kwargs}
        q, block_d = args["Q"], args["BLOCK_D"]
        mma_sync = False
        if q.dtype == torch.float32:
            candidates = self.fp32
        else:
            arch = _arch(q.device.index)
            candidates, mma_sync = self.for_head_dim(block_d, arch), arch < 90

        def size(config):
            extra = self.tma_shared_memory(config, block_d) if args.get("TMA") else 0
            if mma_sync:
                extra += self.mma_sync_shared_memory(config, block_d, q.element_size())
            return self.shared_memory(config, block_d, q.element_size()) + extra

        limit = _shared_memory_bytes(q.device.index)
        kept = [c for c in candidates if size(c) <= limit] or [min(candidates, key=size)]
        if len(kept) > 1 and capturing(q):
            warnings.warn(
                "fused-attention: a Triton kernel met a new shape during CUDA-graph capture; it runs its first "
                "config, untuned, for this shape from now on. Call it once before capturing to tune it.",
                stacklevel=2,
            )
            return kept[:1]
        return kept


def capturing(x):
    """Whether x's CUDA stream is being captured into a CUDA graph."""
    return x.is_cuda and torch.cuda.is_current_stream_capturing()


@triton.jit
def program_tile(n_rows, n_heads, BLOCK: tl.constexpr):
    """(first row, batch, head) of this program's tile; grid x enumerates (batch, head, row tile).

    One grid axis for all three: grid y and z stop at 65535, x at 2**31 - 1. Row tiles vary fastest, so
    programs running side by side share one head's K and V in L2. batch and head are int64, as every
    offset built from them must be: batch * stride passes 2**31 elements long before any count does.
    """
    pid = tl.program_id(0)
    n_tiles = tl.cdiv(n_rows, BLOCK)
    batch_head = pid // n_tiles
    return (pid % n_tiles) * BLOCK, (batch_head // n_heads).to(tl.int64), (batch_head % n_heads).to(tl.int64)


def program_grid(n_rows, heads, batch, block_name):
    """The launch grid for `program_tile`, from the autotuned block size named `block_name`."""
    return lambda meta: (triton.cdiv(n_rows, meta[block_name]) * heads * batch,)


@triton.jit
def load_rows(base, rows, row_stride, n_rows, cols, HEAD_DIM: tl.constexpr):
    """A (len(rows), len(cols)) tile of an (n_rows, HEAD_DIM) matrix with unit column stride; zero outside it.

    Row offsets are int64: (n_rows - 1) * row_stride passes 2**31 in a long sequence whose rows are far
    apart, e.g. a (B, N, H, D) view with H * D = 8192 and N >= 262144.
    """
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    return tl.load(base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], mask=mask, other=0.0)


@triton.jit
def load_row_tile(rows, start, offs, row_stride, n_rows, cols, HEAD_DIM: tl.constexpr, TMA: tl.constexpr):
    """Rows offs = start + arange(...) of an (n_rows, HEAD_DIM) matrix, zero outside it: through rows, a TMA
    descriptor of the matrix (TMA), or by load_rows from rows, its first row's pointer."""
    if TMA:
        tile = rows.load([start, 0])
    else:
        tile = load_rows(rows, offs, row_stride, n_rows, cols, HEAD_DIM)
    return tile


@triton.jit
def store_rows(base, tile, rows, row_stride, n_rows, cols, HEAD_DIM: tl.constexpr, kept_rows=None):
    """Store the rows of `tile` in bounds (and, if kept_rows is given, where it is True); the mirror of load_rows."""
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    if kept_rows is not None:
        mask = mask & kept_rows[:, None]
    tl.store(base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], tile, mask=mask)


@triton.jit
def sequence(CU_SEQLENS, batch, n_rows, VARLEN: tl.constexpr):
    """(first row, length) of batch element `batch`'s query or key sequence.

    Dense: rows 0 .. n_rows - 1 of the batch element's own slice. Varlen: rows cu[batch] .. cu[batch + 1] - 1
    of the packed tensors, whose batch elements all live in batch 0 (the launchers pass a batch stride of
    0). The first row is int64, as every offset built from it must be.
    """
    if VARLEN:
        first = tl.load(CU_SEQLENS + batch)
        return first.to(tl.int64), tl.load(CU_SEQLENS + batch + 1) - first
    else:
        return 0, n_rows


@triton.jit
def real_keys(key_mask_row, key, n_k, PADDED: tl.constexpr):
    """Which keys exist: in bounds and, with PADDED, not padding (key_mask_row: the batch element's row of
    the bool key padding mask). key is an index tensor of any shape; the result has its shape."""
    real = key < n_k
    if PADDED:
        real = real & (tl.load(key_mask_row + key, mask=real, other=0) != 0)
    return real


def real_key_bounds(key_padding_mask):
    """int32 (B, 2): each batch element's first real key and last real key + 1 ((Nk, 0) if it has none),
    the key range the forward and dQ kernels loop over (`key_range`). Device-side: no host sync."""
    batch, n_k = key_padding_mask.shape
    # One padding key appended: the reductions then never run over zero keys (Nk = 0).
    real = torch.cat((key_padding_mask, key_padding_mask.new_zeros(batch, 1)), 1)
    positions = torch.arange(n_k + 1, device=real.device, dtype=torch.int32)
    first = torch.where(real, positions, n_k).amin(1)
    end = torch.where(real, positions + 1, 0).amax(1)
    return torch.stack((first, end), 1).to(torch.int32)


@triton.jit
def any_key(real):
    """Whether a key tile's 1-D `real_keys` holds any real key (the dK/dV kernel skips a tile without one)."""
    return tl.max(real.to(tl.int32), 0) > 0


@triton.jit
def key_range(start_m, n_q, n_k, key_bounds, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              CAUSAL: tl.constexpr, PADDED: tl.constexpr, WINDOW: tl.constexpr):
    """Keys a query tile [start_m, start_m + BLOCK_M) works on, as (start, unmasked_start, unmasked_end,
    visible_end).

    Key tiles in [unmasked_start, unmasked_end) are in bounds and visible to every query of the tile, so they
    need no mask; tiles in [start, unmasked_start) and [unmasked_end, visible_end) straddle the causal
    diagonal, a window edge or the end of the keys, or may hold padding, and must be masked; keys before
    start or from visible_end on are hidden from every query of the tile and are skipped. Causal is
    bottom-right aligned: query i sees key j when j <= i + n_k - n_q. Without WINDOW, unmasked_start is start.
    WINDOW: query i sees keys i + shift - left .. i + shift + right (`visible`), so the tile's keys span
    about BLOCK_M + left + right and a fixed window costs O(n_q * window), not O(n_q * n_k).
    PADDED: key_bounds points to the batch element's (first real key, last real key + 1) (`real_key_bounds`):
    the key tiles before and after them, left and right padding, are skipped; the others are all masked.
    Padding tiles between real keys are masked, not skipped: a branch around a tile's dots in the loop stops
    Triton's software pipelining of the K/V loads (no cp.async, sm_80 spills), a price every padded call
    would pay for the rare batch with a hole of a whole tile.
    """
    if WINDOW:
        shift = n_k - n_q
        first_diagonal = start_m + shift  # key on the diagonal of the tile's first query, and its last one
        last_diagonal = start_m + BLOCK_M - 1 + shift
        # Clamped to [0, n_k] before any division: integer division rounds toward zero on the GPU.
        first_key = tl.minimum(tl.maximum(first_diagonal - left, 0), n_k)
        visible_end = tl.minimum(tl.maximum(last_diagonal + right + 1, 0), n_k)
        start = (first_key // BLOCK_N) * BLOCK_N
        if PADDED:  # all masked, as without a window
            start = tl.maximum(start, (tl.load(key_bounds) // BLOCK_N) * BLOCK_N)
            visible_end = tl.minimum(visible_end, tl.load(key_bounds + 1))
            unmasked_start = start
            unmasked_end = start
        else:
            # Keys every query of the tile sees: last_diagonal - left .. first_diagonal + right.
            unmasked_start = tl.cdiv(tl.minimum(tl.maximum(last_diagonal - left, 0), n_k), BLOCK_N) * BLOCK_N
            unmasked_end = (tl.minimum(tl.maximum(first_diagonal + right + 1, 0), n_k) // BLOCK_N) * BLOCK_N
            # No whole tile seen by every query: every tile goes to the masked loop from start.
            none_unmasked = unmasked_end <= unmasked_start
            unmasked_start = tl.where(none_unmasked, start, unmasked_start)
            unmasked_end = tl.where(none_unmasked, start, unmasked_end)
    else:
        if CAUSAL:
            shift = n_k - n_q
            unmasked_end = tl.minimum(tl.maximum(start_m + shift + 1, 0), n_k)
            visible_end = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), n_k)
        else:
            unmasked_end = n_k
            visible_end = n_k
        if PADDED:
            start = (tl.load(key_bounds) // BLOCK_N) * BLOCK_N
            visible_end = tl.minimum(visible_end, tl.load(key_bounds + 1))
            unmasked_end = start
        else:
            start = 0
            unmasked_end = (unmasked_end // BLOCK_N) * BLOCK_N
        unmasked_start = start
    return start, unmasked_start, unmasked_end, visible_end


@triton.jit
def query_range(start_n, n_q, n_k, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                WINDOW: tl.constexpr):
    """Queries a key tile [start_n, start_n + BLOCK_N) works on, as (masked_start, unmasked_start,
    unmasked_end, visible_end), the mirror of key_range.

    Query tiles before masked_start or from visible_end on see none of the tile's keys and are skipped; tiles
    in [masked_start, unmasked_start) and [unmasked_end, visible_end) must be masked; tiles in
    [unmasked_start, unmasked_end) see every key of the tile. Without WINDOW, unmasked_end and visible_end are
    n_q. Key padding changes nothing here: the dK/dV kernel skips a key tile of padding only, and zeroes
    padding keys' rows.
    """
    if WINDOW:
        # Query i sees key j when j - shift - right <= i <= j - shift + left (clamped to [0, n_q] before any
        # division, which rounds toward zero on the GPU).
        shift = n_k - n_q
        last_key = start_n + BLOCK_N - 1
        first_seeing = tl.minimum(tl.maximum(start_n - shift - right, 0), n_q)
        visible_end = tl.minimum(tl.maximum(last_key - shift + left + 1, 0), n_q)
        masked_start = (first_seeing // BLOCK_M) * BLOCK_M
        # Queries that see every key of the tile: last_key - shift - right .. start_n - shift + left.
        unmasked_start = tl.cdiv(tl.minimum(tl.maximum(last_key - shift - right, 0), n_q), BLOCK_M) * BLOCK_M
        unmasked_end = (tl.minimum(tl.maximum(start_n - shift + left + 1, 0), n_q) // BLOCK_M) * BLOCK_M
        none_unmasked = unmasked_end <= unmasked_start
        unmasked_start = tl.where(none_unmasked, masked_start, unmasked_start)
        unmasked_end = tl.where(none_unmasked, masked_start, unmasked_end)
    else:
        if CAUSAL:
            # Query i sees key j when i >= j - (n_k - n_q): the first query tile that sees key start_n, and
            # the first one that sees the tile's last key.
            shift = n_k - n_q
            first_seeing = tl.minimum(tl.maximum(start_n - shift, 0), n_q)
            all_seeing = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), n_q)
            masked_start = (first_seeing // BLOCK_M) * BLOCK_M
            unmasked_start = tl.cdiv(all_seeing, BLOCK_M) * BLOCK_M
        else:
            masked_start = 0
            unmasked_start = 0
        unmasked_end = n_q
        visible_end = n_q
    return masked_start, unmasked_start, unmasked_end, visible_end


@triton.jit
def visible(query, key, real, n_q, n_k, left, right, CAUSAL: tl.constexpr, WINDOW: tl.constexpr):
    """Mask of the (query, key) pairs that count: a real key (`real_keys` of key) and, if causal, not after
    the query's diagonal; with WINDOW, within left keys before and right keys after it (the launchers pass
    CAUSAL False and right 0 for a causal window, and turn an unbounded side into a bound past every key).

    query and key are index tensors that broadcast to the tile: (M, 1) and (1, N) for a scores tile,
    (1, M) and (N, 1) for a transposed one; real has key's shape.
    """
    mask = real
    if WINDOW:
        diagonal = query + (n_k - n_q)
        mask = mask & (key >= diagonal - left) & (key <= diagonal + right)
    elif CAUSAL:
        mask = mask & (key <= query + (n_k - n_q))
    return mask


@triton.jit
def tanh(x):
    """tanh from exp2 (Triton has no tanh of its own; libdevice's does not run on the interpreter).

    Odd, and computed at -|x| so that exp2 never overflows. Its absolute error is a few float32 ulps of 1,
    like that of tanh itself near +-1, where softcapped scores live.
    """
    e = tl.math.exp2(tl.abs(x) * (-2.0 * LOG2E))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def modified_scores(qk, query, key, shift, scale_log2, softcap_log2, slope_log2, SOFTCAP: tl.constexpr,
                    ALIBI: tl.constexpr):
    """Scores in base 2 (natural-log scores times log2(e)) of the raw products qk = q.k, and tanh of the
    capped ones (the softcap's derivative is 1 - tanh^2; 0.0 without SOFTCAP).

    SOFTCAP: softcap_log2 = softcap * log2(e), s = softcap * tanh(scale * qk / softcap). ALIBI: s -= slope *
    |query + shift - key|, slope_log2 = slope * log2(e); query and key are index tensors as for `visible`.
    """
    if SOFTCAP:
        t = tanh(qk * (scale_log2 / softcap_log2))
        s = t * softcap_log2
    else:
        t = 0.0
        s = qk * scale_log2
    if ALIBI:
        s = s - slope_log2 * tl.abs(query + shift - key).to(tl.float32)
    return s, t


@triton.jit
def alibi_slope_log2(ALIBI_SLOPES, batch, head, n_heads, ALIBI: tl.constexpr):
    """Query head `head`'s ALiBi slope in batch element (varlen: sequence) `batch`, times log2(e), from the
    float32 (B, Hq) slopes; 0.0 without ALIBI."""
    if ALIBI:
        return tl.load(ALIBI_SLOPES + batch * n_heads + head) * LOG2E
    else:
        return 0.0


@triton.jit
def philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11) on uint32 tensors that broadcast together: the four output words
    of counter (c0, c1, c2, c3) under key (k0, k1). The same function as attention.dropout.philox4x32.

    The rounds are unrolled, so the words only take the broadcast shape of the counters that reach them:
    while a counter word is per-row or per-column, so is its work.
    """
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi1 = tl.umulhi(c2, 0xCD9E8D57)
        lo1 = c2 * 0xCD9E8D57
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def dropout_keep(seed, offset, batch_head, query, start_n, threshold, BLOCK_N: tl.constexpr):
    """The dropout keep-mask of queries `query` (a 1-D index tensor) against keys start_n .. start_n +
    BLOCK_N - 1, (len(query), BLOCK_N) bool, True where P is kept (attention.dropout_mask's bits).

    Counter (j >> 2, i, batch * Hq + head, offset), key (seed's low and high words): one Philox call per
    query and group of 4 keys (start_n is a multiple of BLOCK_N, hence of 4), on a (len(query), BLOCK_N // 4)
    tile whose 4 words are then interleaved along the keys: key j takes word j & 3.
    """
    groups = (start_n // 4 + tl.arange(0, BLOCK_N // 4)).to(tl.uint32)
    seed = seed.to(tl.int64)  # the interpreter passes a small seed as int32, whose >> 32 is undefined
    w0, w1, w2, w3 = philox4x32(
        groups[None, :], query.to(tl.uint32)[:, None], batch_head.to(tl.uint32), offset.to(tl.uint32),
        (seed & 0xFFFFFFFF).to(tl.uint32), (seed >> 32).to(tl.uint32),
    )
    # join(join(w0, w2), join(w1, w3))[..., x, y] is word 2x + y: row-major, the 4 words of a group in order.
    words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (query.shape[0], BLOCK_N))
    return words >= threshold.to(tl.uint32)


def option_arguments(causal, n_q, n_k, window_left, window_right, softcap, alibi_slopes, dropout_p, dropout_seed,
                     dropout_offset):
    """The kernels' keyword arguments for the score options (attention_forward lists them): runtime values
    and the constexpr flags that compile an option's code in, so that a call without options runs the code
    it ran before they existed.

    causal arrives as window_right == 0 (or with window_right -1, the same). A window with a bound on the
    left, or on the right of a non-causal call, runs the WINDOW code (CAUSAL off: its bounds include the
    causal one); an unbounded side becomes a bound past every key of the longest sequences (n_k keys on the
    left, n_q on the right), so the kernels never test for -1.
    """
    window = window_left >= 0 or (window_right >= 0 and not causal)
    right = 0 if causal else window_right
    return dict(
        window_left=window_left if window_left >= 0 else n_k,
        window_right=right if right >= 0 else n_q,
        softcap_log2=softcap * LOG2E.value,
        dropout_seed=dropout_seed,
        dropout_offset=dropout_offset,
        # floor(p * 2**32) in double (a Python float), < 2**32 for p < 1: attention.dropout's threshold.
        dropout_threshold=math.floor(dropout_p * 4294967296.0),
        dropout_scale=1.0 / (1.0 - dropout_p),
        CAUSAL=causal and not window,
        WINDOW=window,
        SOFTCAP=softcap > 0,
        ALIBI=alibi_slopes is not None,
        DROPOUT=dropout_p > 0,
    )


# The most shared memory a TMA build of a kept config takes beyond its tiles' estimate (its barriers; the
# compile gate, tests/test_triton_compile.py, holds every TMA build to it).
TMA_SHARED_BYTES = 2048

# Whether the interpreter runs the TMA path where a GPU would (tests set it: the pointer path, which every
# GPU before sm_90 runs, is the interpreter's default).
TMA_UNDER_INTERPRETER = False


def uses_tma(*tensors):
    """Whether a kernel reads these fp16/bf16 tensors' tiles through TMA descriptors: on sm_90 and later
    (or the interpreter, where TMA_UNDER_INTERPRETER), where TMA can address them: a 16-byte aligned
    start and strides of multiples of 16 bytes (but the last dimension's, contiguous). Other layouts, such
    as an odd head dim's rows packed back to back, take the pointer path."""
    x = tensors[0]
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x.device.type == "cuda":
        if torch.cuda.get_device_capability(x.device)[0] < 9:
            return False
        _set_tma_allocator()
    elif not (INTERPRETING and TMA_UNDER_INTERPRETER):
        return False
    return all(
        t.data_ptr() % 16 == 0 and t.stride(-1) == 1
        and all(size == 1 or stride * t.element_size() % 16 == 0 for size, stride in zip(t.shape[:-1], t.stride()[:-1]))
        for t in tensors
    )


def _tma_allocator(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _set_tma_allocator():
    """Descriptors made in a kernel (tl.make_tensor_descriptor) live in global memory that Triton asks its
    allocator for at launch; it has none unless one is set. An allocator the caller set is kept."""
    from triton.runtime import _allocation

    if _allocation._allocator.get() is _allocation._NULL_ALLOCATOR:
        triton.set_allocator(_tma_allocator)


def kernel_strides(x, varlen):
    """x's strides as the kernels take them: all but the last, a unit stride, with the batch's 0 in varlen,
    where every sequence lives in batch 0."""
    return (0 if varlen else x.stride(0), *x.stride()[1:-1])


def new_rows(batch, heads, n_rows, head_dim, varlen, like):
    """A new (batch, heads, n_rows, head_dim) tensor with like's dtype and device: contiguous, or in varlen
    (batch 1) the 4-D view of a contiguous (n_rows, heads, head_dim) tensor, flash-attn's packed layout."""
    if varlen:
        return like.new_empty((n_rows, heads, head_dim)).transpose(0, 1).unsqueeze(0)
    return like.new_empty((batch, heads, n_rows, head_dim))
