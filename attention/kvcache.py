"""flash_attention_with_kvcache: a few new query rows against a KV cache, the shape of decoding.

One query row per (sequence, head) cannot fill a GPU, so the key axis is split across programs
(flash-decoding): each part attends to a contiguous chunk of the cache, and attention/merge.py merges
the parts by their log-sum-exp. The cache is dense, one slab per sequence, or paged (vLLM's layout):
fixed-size blocks shared by all sequences, each sequence's blocks listed in a block table.
"""
import os

import torch

from .api import _score_options
from .backends import select_backend
from .merge import merge_partials
from .validation import AttentionOptions, check_kvcache_values, resolve_scale, validate_kvcache

# A split shorter than this spends more on its own launch, partial write and merge than it saves.
MIN_KEYS_PER_SPLIT = 256
# On a CPU a split also costs a pool thread's wake-up: on the shared 2-core machine of benchmarks/NOTES.md
# (decode section), splitting one KV head lost below ~16K keys and won 1.8x at 32K.
MIN_KEYS_PER_SPLIT_CPU = 16384
MAX_SPLITS = 64


def choose_num_splits(batch, kv_heads, max_keys, device):
    """How many parts to split each sequence's keys into: enough (sequence, KV head, part) work items
    for every SM (GPU) or thread (CPU), none shorter than MIN_KEYS_PER_SPLIT(_CPU) keys. The query heads of a
    KV head share its work item (they read the same keys). `max_keys` is the cache's capacity, known
    without reading cache_seqlens from the device."""
    device = torch.device(device)
    if device.type == "cuda":
        workers = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        workers = torch.get_num_threads()
    wanted = -(-workers // max(1, batch * kv_heads))
    min_keys = MIN_KEYS_PER_SPLIT if device.type == "cuda" else MIN_KEYS_PER_SPLIT_CPU
    return max(1, min(wanted, max_keys // min_keys, MAX_SPLITS))


def append_to_cache(cache, new, cache_seqlens, block_table=None):
    """Writes new (B, Hkv, Nnew, D) into cache at positions cache_seqlens[b] .. + Nnew of each sequence,
    in place: dense cache (B, Hkv, Ncache, D), or paged (num_blocks, Hkv, block_size, D) through
    block_table (B, max_blocks). No other element of the cache changes."""
    batch, _, n_new, _ = new.shape
    positions = cache_seqlens[:, None].long() + torch.arange(n_new, device=new.device)  # (B, Nnew)
    if block_table is None:
        slabs, rows = torch.arange(batch, device=new.device)[:, None].expand(batch, n_new), positions
    else:
        block_size = cache.shape[2]
        slabs, rows = block_table.long().gather(1, positions // block_size), positions % block_size
    cache.transpose(1, 2)[slabs, rows] = new.transpose(1, 2)  # (B, Nnew, Hkv, D) rows, written through the view


def _debug_checks():
    return os.environ.get("FUSED_ATTENTION_DEBUG") == "1"


def flash_attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, block_table=None,
                                 causal=True, softmax_scale=None, window=(-1, -1), softcap=0.0, alibi_slopes=None,
                                 backend="auto", return_lse=False, *, num_splits=0, scale=None):
    """Attention of q (B, Hq, Nq, D), a few new rows per sequence, against each sequence's KV cache.

    The cache is dense, k_cache and v_cache (B, Hkv, Ncache, D), or paged, (num_blocks, Hkv, block_size,
    D) with ``block_table`` int32 (B, max_blocks): key j of sequence b is row j % block_size of block
    block_table[b, j // block_size]. Hq is a multiple of Hkv (grouped-query heads read their KV head in
    place). ``cache_seqlens`` (int32 (B,) or an int) counts each sequence's valid keys. ``k_new`` and
    ``v_new`` (B, Hkv, Nnew, D), if given, are first written into the cache at cache_seqlens (in place;
    the caller advances cache_seqlens by Nnew for the next step). The call then attends to the first
    cache_seqlens + Nnew keys of each sequence, positions bottom-right (shift = keys - Nq: with ``causal``,
    the last query row sees every key, the one before all but the last, ...). ``window``, ``softcap`` and
    ``alibi_slopes`` are ``flash_attention``'s. Rows that see no key give 0 (lse -inf).

    The key axis is split into ``num_splits`` parts merged by their log-sum-exp; 0 chooses from the shape
    and device (``choose_num_splits``). Forward only: call it under ``torch.no_grad()`` or
    ``torch.inference_mode()``. Returns o (B, Hq, Nq, D) in q's dtype and, with ``return_lse``, lse float32
    (B, Hq, Nq). Shapes, dtypes and devices are checked before anything is written; the values (cache
    lengths within the cache, block ids within num_blocks) are checked too when the tensors are on the
    CPU, and on a GPU under FUSED_ATTENTION_DEBUG=1 (reading them costs a device sync).
    """
    cache_seqlens = validate_kvcache(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table)
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                       for t in (q, k_cache, v_cache, k_new, v_new)):
        raise RuntimeError("flash_attention_with_kvcache has no backward: call it under torch.no_grad() (or use "
                           "flash_attention for training)")
    if isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0: chosen from the shape), got {num_splits!r}")
    batch = q.shape[0]
    options = AttentionOptions(softmax_scale=resolve_scale(softmax_scale, scale, q.shape[-1]),
                               **_score_options(causal, True, window, softcap, alibi_slopes, 0.0, None, batch, q))
    n_new = 0 if k_new is None else k_new.shape[2]
    paged = block_table is not None
    capacity = block_table.shape[1] * k_cache.shape[2] if paged else k_cache.shape[2]
    if (q.device.type == "cpu" or _debug_checks()) and not torch.compiler.is_compiling():
        check_kvcache_values(cache_seqlens, n_new, capacity, block_table, k_cache.shape[2], k_cache.shape[0])
    chosen = select_backend(q, k_cache, v_cache, options, backend)
    if chosen.decode is None:
        raise RuntimeError(f"backend={chosen.name!r} has no kvcache kernel")
    if k_new is not None:
        append_to_cache(k_cache, k_new, cache_seqlens, block_table)
        append_to_cache(v_cache, v_new, cache_seqlens, block_table)
    seqlens_k = cache_seqlens + n_new if n_new else cache_seqlens
    o, lse = run_decode(chosen, q, k_cache, v_cache, seqlens_k, block_table, options, num_splits)
    return (o, lse) if return_lse else o


def run_decode(backend, q, k_cache, v_cache, seqlens_k, block_table, options, num_splits=0):
    """(o in q's dtype, lse) of a checked call on ``backend``'s decode kernel: its parts, merged."""
    capacity = block_table.shape[1] * k_cache.shape[2] if block_table is not None else k_cache.shape[2]
    splits = num_splits or choose_num_splits(q.shape[0], k_cache.shape[1], capacity, q.device)
    o_parts, lse_parts = backend.decode(q, k_cache, v_cache, seqlens_k, block_table, options, splits)
    o, lse = merge_partials(o_parts, lse_parts)
    return o.to(q.dtype), lse
