"""Pieces shared by the forward and backward kernels: tile loads, which keys a query sees (causal, key
padding, varlen sequences), config rules."""
import functools
import math
import os

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


class KernelConfigs:
    """The autotune configs of one kernel: fp16/bf16 tiles per padded head dim, and fp32 tiles.

    tensor_core maps the largest padded head dim a list serves to its (BLOCK_M, BLOCK_N, num_warps,
    num_stages) tuples, with an optional fifth entry, the lowest architecture that keeps the config (90:
    Hopper only, where it spills on sm_80). Head dim 64 takes the list of 64, head dim 80 that of 128.
    The compile gate (tests/test_triton_compile.py) holds every config, at its head dim, to no spills on
    sm_80 and sm_90 (where kept; its KNOWN_SPILLS lists the exceptions) and every dot a wgmma on sm_90;
    triton_kernels/RESOURCES.md lists their registers and shared memory. fp32 inputs get their own small
    tiles: "ieee" dots run on CUDA cores.
    shared_memory(config, block_d, element_bytes) estimates a config's shared memory.
    """

    def __init__(self, tensor_core, fp32, shared_memory, interpreter_shape):
        self.tensor_core = {
            head_dim: [(make_configs([shape[:4]])[0], shape[4] if len(shape) > 4 else 0) for shape in shapes]
            for head_dim, shapes in sorted(tensor_core.items())
        }
        self.fp32 = make_configs(fp32)
        self.shared_memory = shared_memory
        # The interpreter runs each program as numpy code: one small tile, nothing to tune.
        self.interpreter = make_configs([interpreter_shape])

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
        memory overflows would fail to compile and be skipped anyway; the estimate saves compiling it."""
        args = {**named_args, **kwargs}
        q, block_d = args["Q"], args["BLOCK_D"]
        if q.dtype == torch.float32:
            candidates = self.fp32
        else:
            candidates = self.for_head_dim(block_d, _arch(q.device.index))

        def size(config):
            return self.shared_memory(config, block_d, q.element_size())

        limit = _shared_memory_bytes(q.device.index)
        return [c for c in candidates if size(c) <= limit] or [min(candidates, key=size)]


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
def key_range(start_m, n_q, n_k, key_bounds, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              PADDED: tl.constexpr):
    """Keys a query tile [start_m, start_m + BLOCK_M) works on, as (start, unmasked_end, visible_end).

    Key tiles in [start, unmasked_end) are in bounds and visible to every query of the tile, so they need no
    mask; tiles in [unmasked_end, visible_end) straddle the causal diagonal or the end of the keys, or may
    hold padding, and must be masked; keys before start or from visible_end on are hidden from every query
    of the tile and are skipped. Causal is bottom-right aligned: query i sees key j when j <= i + n_k - n_q.
    PADDED: key_bounds points to the batch element's (first real key, last real key + 1) (`real_key_bounds`):
    the key tiles before and after them, left and right padding, are skipped; the others are all masked.
    Padding tiles between real keys are masked, not skipped: a branch around a tile's dots in the loop stops
    Triton's software pipelining of the K/V loads (no cp.async, sm_80 spills), a price every padded call
    would pay for the rare batch with a hole of a whole tile.
    """
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
        return start, start, visible_end
    else:
        return 0, (unmasked_end // BLOCK_N) * BLOCK_N, visible_end


@triton.jit
def query_range(start_n, n_q, n_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Queries a key tile [start_n, start_n + BLOCK_N) works on, as (masked_start, unmasked_start), the
    mirror of key_range.

    Query tiles before masked_start see none of the tile's keys and are skipped; tiles in [masked_start,
    unmasked_start) must be masked; tiles from unmasked_start on see every key of the tile. Key padding
    changes neither: the dK/dV kernel skips a key tile of padding only, and zeroes padding keys' rows.
    """
    if CAUSAL:
        # Query i sees key j when i >= j - (n_k - n_q): the first query tile that sees key start_n, and the
        # first one that sees the tile's last key.
        shift = n_k - n_q
        first_seeing = tl.minimum(tl.maximum(start_n - shift, 0), n_q)
        all_seeing = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), n_q)
        masked_start = (first_seeing // BLOCK_M) * BLOCK_M
        unmasked_start = tl.cdiv(all_seeing, BLOCK_M) * BLOCK_M
    else:
        masked_start = 0
        unmasked_start = 0
    return masked_start, unmasked_start


@triton.jit
def visible(query, key, real, n_q, n_k, CAUSAL: tl.constexpr):
    """Mask of the (query, key) pairs that count: a real key (`real_keys` of key) and, if causal, not after
    the query's diagonal.

    query and key are index tensors that broadcast to the tile: (M, 1) and (1, N) for a scores tile,
    (1, M) and (N, 1) for a transposed one; real has key's shape.
    """
    mask = real
    if CAUSAL:
        mask = mask & (key <= query + (n_k - n_q))
    return mask


def batch_stride(x, varlen):
    """x.stride(0) for a kernel's batch offset; 0 in varlen, where every sequence lives in batch 0."""
    return 0 if varlen else x.stride(0)


def new_rows(batch, heads, n_rows, head_dim, varlen, like):
    """A new (batch, heads, n_rows, head_dim) tensor with like's dtype and device: contiguous, or in varlen
    (batch 1) the 4-D view of a contiguous (n_rows, heads, head_dim) tensor, flash-attn's packed layout."""
    if varlen:
        return like.new_empty((n_rows, heads, head_dim)).transpose(0, 1).unsqueeze(0)
    return like.new_empty((batch, heads, n_rows, head_dim))
