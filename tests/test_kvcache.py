"""flash_attention_with_kvcache on every fused backend against the float64 naive reference.

Every cache position a call must not read (past each sequence's keys, spare blocks of a paged cache)
holds NaN: a kernel that reads one, or lets a masked key's value into its sums, returns NaN. Every
position a call must not write is compared bit for bit afterwards.
"""
import pytest
import torch

import attention
from attention.kvcache import MIN_KEYS_PER_SPLIT_CPU, append_to_cache, choose_num_splits
from attention.reference import cache_keys, naive_attention_with_kvcache
from grid import (
    DEVICE,
    EMULATED_CUDA,
    INTERPRETED,
    assert_within_rule,
    backends_under_test,
    dtypes_for,
    flash_attention,
    flash_attention_with_kvcache,
    poison_allocator,
)

# Tests that run every dtype on every backend; the others run bf16 alone on the slow backends
# (Triton's interpreter, the CUDA emulator), whose dtype handling the first ones cover.
EVERY_DTYPE = ("test_dense_cache",)


def _slow(backend):
    return backend == EMULATED_CUDA or (backend == "triton" and INTERPRETED)


def pytest_generate_tests(metafunc):
    if "backend" not in metafunc.fixturenames:
        return
    cases = []
    for backend in backends_under_test():
        for dtype in dtypes_for(backend):
            if _slow(backend) and metafunc.function.__name__ not in EVERY_DTYPE and dtype != torch.bfloat16:
                continue
            cases.append(pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}"))
    metafunc.parametrize("backend,dtype", cases)


class Cache:
    """A KV cache for a test: the keys each sequence holds as a dense (B, Hkv, capacity, D) slab
    (NaN past each sequence's length) and, paged, the same keys in shuffled blocks of a pool with
    spare blocks (all NaN)."""

    def __init__(self, lengths, kv_heads, head_dim, capacity, dtype, gen, block_size=None, spare_blocks=3):
        batch = len(lengths)
        self.lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
        self.k, self.v = (torch.full((batch, kv_heads, capacity, head_dim), float("nan"), device=DEVICE, dtype=dtype)
                          for _ in range(2))
        for b, n in enumerate(lengths):
            for t in (self.k, self.v):
                t[b, :, :n] = torch.randn(kv_heads, n, head_dim, generator=gen, device=DEVICE).to(dtype)
        self.block_size, self.block_table = block_size, None
        if block_size is not None:
            blocks_per_sequence = capacity // block_size
            pool = batch * blocks_per_sequence + spare_blocks
            order = torch.randperm(pool, generator=gen, device=DEVICE)[:batch * blocks_per_sequence]
            self.block_table = order.to(torch.int32).reshape(batch, blocks_per_sequence)
            self.pool_shape = (pool, kv_heads, block_size, head_dim)

    def append(self, k_new, v_new):
        """The dense slabs after writing k_new, v_new at each sequence's length (the expected cache)."""
        k, v = self.k.clone(), self.v.clone()
        for b, n in enumerate(self.lengths.tolist()):
            k[b, :, n:n + k_new.shape[2]], v[b, :, n:n + v_new.shape[2]] = k_new[b], v_new[b]
        return k, v

    def storage(self, k=None, v=None):
        """(k_cache, v_cache) as the call takes them: fresh copies of the slabs, or pools of blocks."""
        k, v = (self.k if k is None else k), (self.v if v is None else v)
        if self.block_table is None:
            return k.clone(), v.clone()
        pools = []
        for slab in (k, v):
            pool = torch.full(self.pool_shape, float("nan"), device=DEVICE, dtype=slab.dtype)
            blocks = slab.unflatten(2, (-1, self.block_size)).transpose(1, 2)  # (B, blocks, Hkv, bs, D)
            pool[self.block_table.long().flatten()] = blocks.flatten(0, 1)
            pools.append(pool)
        return tuple(pools)


def _assert_same_bits(name, got, expected):
    assert torch.equal(got.isnan(), expected.isnan()) and torch.equal(got.nan_to_num(), expected.nan_to_num()), (
        f"{name}: the call changed cache elements it should not have, or missed the new rows")


def check_decode(backend, dtype, *, lengths=(0, 17, 50), q_heads=4, kv_heads=2, head_dim=40, n_q=1, n_new=0,
                 capacity=64, block_size=None, causal=True, num_splits=0, seed=0, **modifiers):
    """One flash_attention_with_kvcache call against the float64 reference on the expected cache, and
    the cache afterwards against the expected append."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    cache = Cache(lengths, kv_heads, head_dim, capacity, dtype, gen, block_size)
    batch = len(lengths)
    q = torch.randn(batch, q_heads, n_q, head_dim, generator=gen, device=DEVICE).to(dtype)
    k_new = v_new = None
    expected_k, expected_v = cache.k, cache.v
    if n_new:
        k_new, v_new = (torch.randn(batch, kv_heads, n_new, head_dim, generator=gen, device=DEVICE).to(dtype)
                        for _ in range(2))
        expected_k, expected_v = cache.append(k_new, v_new)
    k_cache, v_cache = cache.storage()
    poison_allocator()
    with torch.no_grad():
        o, lse = flash_attention_with_kvcache(q, k_cache, v_cache, cache.lengths, backend, k_new=k_new, v_new=v_new,
                                              block_table=cache.block_table, causal=causal, return_lse=True,
                                              num_splits=num_splits, **modifiers)
    for name, got, expected in zip(("k_cache", "v_cache"), (k_cache, v_cache), cache.storage(expected_k, expected_v)):
        _assert_same_bits(name, got, expected)
    seqlens_k = cache.lengths + n_new
    reference = lambda *tensors: naive_attention_with_kvcache(*tensors, seqlens_k, None, causal, return_lse=True,
                                                              **modifiers)
    ref_o, ref_lse = reference(q.double(), expected_k.double(), expected_v.double())
    low_o, low_lse = reference(q, expected_k, expected_v)
    assert o.dtype == q.dtype and o.shape == q.shape and lse.dtype == torch.float32
    hidden = ref_lse.isinf()
    assert torch.equal(lse.isneginf(), hidden), "lse must be -inf exactly on rows that see no key"
    assert_within_rule("lse", lse[~hidden], ref_lse[~hidden], low_lse[~hidden], 2)
    assert_within_rule("o", o, ref_o, low_o, 2)
    if hidden.any():
        assert o[hidden].abs().max().item() == 0, "rows that see no key must give 0"
    return o, lse


@pytest.mark.parametrize("n_q", [1, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_dense_cache(backend, dtype, n_q, causal):
    """Cache-only calls on ragged lengths, an empty sequence among them (its rows see no key)."""
    check_decode(backend, dtype, n_q=n_q, causal=causal)


@pytest.mark.parametrize("n_q", [1, 4])
def test_paged_cache_with_append(backend, dtype, n_q):
    """Blocks of 16 in shuffled order with spare blocks; appends that cross a block boundary (15 + 4)."""
    check_decode(backend, dtype, lengths=(5, 15, 30), n_q=n_q, n_new=n_q, block_size=16)


def test_dense_cache_with_append_and_multi_query(backend, dtype):
    check_decode(backend, dtype, lengths=(0, 31, 60), q_heads=4, kv_heads=1, n_q=4, n_new=4)


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_split_counts_agree(backend, dtype, num_splits):
    """Parts of every size, empty ones included (8 parts of 20 keys), merged by lse."""
    check_decode(backend, dtype, lengths=(20, 150), capacity=160, head_dim=64, n_q=2, num_splits=num_splits, seed=1)


def test_score_modifiers(backend, dtype):
    slopes = torch.rand(3, 4, device=DEVICE, dtype=torch.float32)
    check_decode(backend, dtype, lengths=(7, 16, 40), n_q=3, n_new=3, block_size=16, window=(9, 0), softcap=4.0,
                 alibi_slopes=slopes, num_splits=2)


def test_agrees_with_the_dense_kernel(backend, dtype):
    """One sequence's decode step is flash_attention with bottom-right causal on its keys."""
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    q = torch.randn(1, 4, 2, 32, generator=gen, device=DEVICE).to(dtype)
    k, v = (torch.randn(1, 2, 45, 32, generator=gen, device=DEVICE).to(dtype) for _ in range(2))
    dense = flash_attention(q, k, v, backend, causal=True)
    with torch.no_grad():
        decoded = flash_attention_with_kvcache(q, k, v, 45, backend, num_splits=2)
    ref = attention.naive_attention(q.double(), k.double(), v.double(), causal=True)
    low = attention.naive_attention(q, k, v, causal=True)
    assert_within_rule("dense kernel", dense, ref, low, 2)
    assert_within_rule("kvcache", decoded, ref, low, 2)


# The rest checks the Python layer once, on the naive backend (CPU tensors: every check runs).

def _valid_call(gen=None, block_table=False):
    gen = gen or torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 1, 16, generator=gen)
    if block_table:
        k_cache, v_cache = (torch.randn(5, 2, 8, 16, generator=gen) for _ in range(2))
        table = torch.tensor([[0, 3], [4, 1]], dtype=torch.int32)
    else:
        k_cache, v_cache = (torch.randn(2, 2, 16, 16, generator=gen) for _ in range(2))
        table = None
    new = [torch.randn(2, 2, 1, 16, generator=gen) for _ in range(2)]
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=torch.tensor([3, 9], dtype=torch.int32),
                k_new=new[0], v_new=new[1], block_table=table)


BAD_CALLS = [
    (dict(q=torch.randn(2, 4, 16)), ValueError, "q must have rank 4"),
    (dict(k_cache=torch.randn(2, 2, 16, 16).half()), TypeError, "k_cache has dtype"),
    (dict(v_cache=torch.randn(2, 2, 12, 16)), ValueError, "v_cache has shape"),
    (dict(k_cache=torch.randn(2, 3, 16, 16), v_cache=torch.randn(2, 3, 16, 16)), ValueError, "not a multiple of the 3"),
    (dict(k_cache=torch.randn(3, 2, 16, 16), v_cache=torch.randn(3, 2, 16, 16)), ValueError, "k_cache has batch 3"),
    (dict(k_cache=torch.randn(2, 2, 16, 32)[..., ::2], v_cache=torch.randn(2, 2, 16, 16)), ValueError,
     "k_cache must have a contiguous last dim"),
    (dict(cache_seqlens=torch.tensor([3, 9])), TypeError, "cache_seqlens must be int32"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, r"cache_seqlens must have shape \(batch,\)"),
    (dict(cache_seqlens=torch.tensor([3, 16], dtype=torch.int32)), ValueError, r"cache_seqlens\[1\] = 16 plus 1 new"),
    (dict(cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32)), ValueError, "cache_seqlens must be >= 0"),
    (dict(v_new=None), ValueError, "k_new and v_new must be given together"),
    (dict(k_new=torch.randn(2, 4, 1, 16)), ValueError, r"k_new must have shape \(batch, kv_heads, n_new, head_dim\)"),
    (dict(num_splits=-1), ValueError, "num_splits must be an int >= 0"),
    (dict(window=(2,)), TypeError, "window must be a pair"),
    (dict(backend="cuda"), RuntimeError, "backend='cuda' cannot run this call"),
]

BAD_PAGED_CALLS = [
    (dict(block_table=torch.tensor([[0, 3], [4, 1]])), TypeError, "block_table must be int32"),
    (dict(block_table=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "block_table must have rank 2"),
    (dict(block_table=torch.tensor([[0, 3]], dtype=torch.int32)), ValueError, r"block_table must have shape \(batch"),
    (dict(block_table=torch.tensor([[0, 3], [4, 5]], dtype=torch.int32)), ValueError,
     r"block_table\[1, 1\] = 5 is outside the cache's 5 blocks"),
    (dict(cache_seqlens=torch.tensor([3, 16], dtype=torch.int32)), ValueError, "exceeds the cache's 16 positions"),
]


@pytest.mark.parametrize("paged,change,error,match", [(False, *c) for c in BAD_CALLS] + [(True, *c) for c in BAD_PAGED_CALLS])
def test_bad_input_names_the_argument_and_leaves_the_cache_untouched(paged, change, error, match):
    call = _valid_call(block_table=paged) | change
    caches = [call["k_cache"].clone(), call["v_cache"].clone()]
    with torch.no_grad(), pytest.raises(error, match=match):
        attention.flash_attention_with_kvcache(**{"backend": "naive"} | call)
    assert torch.equal(call["k_cache"], caches[0]) and torch.equal(call["v_cache"], caches[1])


def test_a_training_call_is_refused():
    call = _valid_call()
    call["q"].requires_grad_()
    with pytest.raises(RuntimeError, match="no backward: call it under torch.no_grad"):
        attention.flash_attention_with_kvcache(**call)


def test_an_int_cache_seqlens_means_every_sequence():
    call = _valid_call()
    with torch.no_grad():
        as_int = attention.flash_attention_with_kvcache(**(call | dict(cache_seqlens=5, k_new=None, v_new=None)),
                                                        backend="naive")
        as_tensor = attention.flash_attention_with_kvcache(
            **(call | dict(cache_seqlens=torch.tensor([5, 5], dtype=torch.int32), k_new=None, v_new=None)), backend="naive")
    assert torch.equal(as_int, as_tensor)


def test_append_writes_the_new_rows_and_nothing_else():
    gen = torch.Generator().manual_seed(4)
    dense = torch.randn(2, 3, 20, 8, generator=gen)
    pool = torch.randn(6, 3, 4, 8, generator=gen)
    table = torch.tensor([[5, 0, 2], [1, 4, 3]], dtype=torch.int32)
    lengths = torch.tensor([2, 7], dtype=torch.int32)
    new = torch.randn(2, 3, 3, 8, generator=gen)
    expected_dense, expected_pool = dense.clone(), pool.clone()
    for b, n in enumerate(lengths.tolist()):
        expected_dense[b, :, n:n + 3] = new[b]
        for t in range(3):
            position = n + t
            expected_pool[table[b, position // 4], :, position % 4] = new[b, :, t]
    append_to_cache(dense, new, lengths)
    append_to_cache(pool, new, lengths, table)
    assert torch.equal(dense, expected_dense) and torch.equal(pool, expected_pool)


def test_paged_reference_reads_the_blocks_of_the_table():
    gen = torch.Generator().manual_seed(5)
    cache = Cache((3, 14, 16), 2, 8, 32, torch.float64, gen, block_size=8)
    k_pool, v_pool = cache.storage()
    q = torch.randn(3, 4, 2, 8, generator=gen, dtype=torch.float64)
    for b, n in enumerate(cache.lengths.tolist()):
        assert torch.equal(cache_keys(k_pool, cache.block_table, b, n), cache.k[b:b + 1, :, :n])
    paged = naive_attention_with_kvcache(q, k_pool, v_pool, cache.lengths, cache.block_table)
    dense = naive_attention_with_kvcache(q, cache.k, cache.v, cache.lengths)
    assert torch.equal(paged, dense)


def test_split_count_fills_the_workers_and_keeps_splits_long():
    threads = torch.get_num_threads()
    assert choose_num_splits(1, 1, 100 * MIN_KEYS_PER_SPLIT_CPU, "cpu") == threads
    assert choose_num_splits(threads, 1, 100 * MIN_KEYS_PER_SPLIT_CPU, "cpu") == 1
    assert choose_num_splits(1, 1, MIN_KEYS_PER_SPLIT_CPU - 1, "cpu") == 1
