"""Pieces shared by the forward and backward kernels: tile loads, the causal key range, config rules."""
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


def autotune_configs(tensor_core_configs, fp32_configs, interpreter_shape):
    """All configs one kernel's autotuner may pick from; just one small tile under the interpreter."""
    if INTERPRETING:
        return make_configs([interpreter_shape])
    return tensor_core_configs + fp32_configs


@functools.cache
def _shared_memory_bytes(device_index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]


def config_pruner(estimate_bytes, fp32_configs):
    """An autotune `early_config_prune`: configs meant for the input dtype whose shared memory fits the device.

    fp32 inputs get their own small tiles: their "ieee" dots run on CUDA cores with operands in registers,
    and the fp16/bf16 tiles spill heavily in fp32. A config whose shared memory overflows would fail to compile
    and be skipped by the autotuner anyway; pruning it from the estimate just saves compiling it (large head
    dims). The smallest config for the dtype always stays.
    """

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q = args["Q"]
        is_fp32 = q.dtype == torch.float32
        candidates = [c for c in configs if (c in fp32_configs) == is_fp32]

        def size(config):
            return estimate_bytes(config, args["BLOCK_D"], q.element_size())

        limit = _shared_memory_bytes(q.device.index)
        return [c for c in candidates if size(c) <= limit] or [min(candidates, key=size)]

    return prune


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
def store_rows(base, tile, rows, row_stride, n_rows, cols, HEAD_DIM: tl.constexpr):
    mask = (rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM)
    tl.store(base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :], tile, mask=mask)


@triton.jit
def key_range(start_m, n_q, n_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Keys a query tile [start_m, start_m + BLOCK_M) works on, as (unmasked_end, visible_end).

    Key tiles in [0, unmasked_end) are in bounds and visible to every query of the tile, so they need no
    mask; tiles in [unmasked_end, visible_end) straddle the causal diagonal or the end of the keys and must
    be masked; keys from visible_end on are hidden from every query of the tile and are skipped.
    Causal is bottom-right aligned: query i sees key j when j <= i + n_k - n_q.
    """
    if CAUSAL:
        shift = n_k - n_q
        unmasked_end = tl.minimum(tl.maximum(start_m + shift + 1, 0), n_k)
        visible_end = tl.minimum(tl.maximum(start_m + BLOCK_M + shift, 0), n_k)
    else:
        unmasked_end = n_k
        visible_end = n_k
    return (unmasked_end // BLOCK_N) * BLOCK_N, visible_end


@triton.jit
def visible(query, key, n_q, n_k, CAUSAL: tl.constexpr):
    """Mask of the (query, key) pairs that count: key in bounds and, if causal, not after the query's diagonal.

    query and key are index tensors that broadcast to the tile: (M, 1) and (1, N) for a scores tile,
    (1, M) and (N, 1) for a transposed one.
    """
    mask = key < n_k
    if CAUSAL:
        mask = mask & (key <= query + (n_k - n_q))
    return mask
