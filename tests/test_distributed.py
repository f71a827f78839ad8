"""attention.distributed: ring attention on gloo process groups of 2 and 4 CPU processes.

One start of W processes per world size runs the whole matrix inside them (starting processes costs
more than the tiny cases; forked where the platform can, so that they need not import torch again): forward and every gradient against single-process attention on the full tensors,
causal or not, both layouts, GQA, fp32 (to rounding, against flash_attention) and bf16 (the 2x / 3x
rule against an fp32 reference); gather_sequence; the reference GPT trained a few steps context-parallel
against the same GPT on one process; and the errors that need a live group. Checks that need no group
run here, in the test process.
"""
import json
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attention
from attention.distributed import check_group_device, gather_sequence, ring_attention, shard_sequence
from attention.models import GPT, GPTConfig
from attention.nn import MultiHeadAttention
from grid import assert_within_rule

WORLD_SIZES = (2, 4)
START_METHOD = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
HEAD_DIM = 16
TOKENS_PER_RANK = 16
# The C++ CPU kernels where they are built (CI requires them), else the naive backend, which has a
# block backward too: the ring is the same whichever kernels run its blocks.
BACKEND = "cpu" if "cpu" in attention.available_backends("cpu") else "naive"


def _full_inputs(world_size, q_heads, kv_heads, dtype, seed):
    """q, k, v and an output gradient over the whole sequence, the same on every rank (same seed)."""
    gen = torch.Generator().manual_seed(seed)
    n = TOKENS_PER_RANK * world_size
    shapes = ((q_heads, n), (kv_heads, n), (kv_heads, n), (q_heads, n))
    return [torch.randn(1, h, length, HEAD_DIM, generator=gen).to(dtype) for h, length in shapes]


def _attention_and_grads(fn, q, k, v, dout):
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    o = fn(q, k, v)
    return (o.detach(), *torch.autograd.grad(o, (q, k, v), dout))


def _check_ring_case(group, layout, causal, q_heads, kv_heads, dtype):
    """One case on the ranks of ``group``: o, dq, dk, dv of this rank's shard against the shards of the
    single-process results on the full tensors."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    case = f"W={world_size} rank {rank} {layout} causal={causal} Hq={q_heads} Hkv={kv_heads} {dtype}"
    q, k, v, dout = _full_inputs(world_size, q_heads, kv_heads, dtype, seed=len(case))
    shard = lambda t: shard_sequence(t, rank, world_size, layout)
    ours = _attention_and_grads(
        lambda q, k, v: ring_attention(q, k, v, causal=causal, group=group, layout=layout, backend=BACKEND),
        shard(q), shard(k), shard(v), shard(dout))
    assert ours[0].dtype == dtype and [t.shape for t in ours[1:]] == [shard(t).shape for t in (q, k, v)]
    names = ("o", "dq", "dk", "dv")
    if dtype == torch.float32:
        expected = _attention_and_grads(
            lambda q, k, v: attention.flash_attention(q, k, v, causal=causal, backend=BACKEND), q, k, v, dout)
        for name, got, want in zip(names, ours, expected):
            torch.testing.assert_close(got, shard(want), msg=lambda m: f"{case} {name}: {m}")
        torch.testing.assert_close(gather_sequence(ours[0], group, layout), expected[0])
        _, lse = ring_attention(shard(q), shard(k), shard(v), causal, group=group, layout=layout, backend=BACKEND,
                                return_lse=True)
        _, expected_lse = attention.flash_attention(q, k, v, causal, backend=BACKEND, return_lse=True)
        torch.testing.assert_close(lse, shard(expected_lse), msg=lambda m: f"{case} lse: {m}")
    else:
        naive = lambda q, k, v: attention.naive_attention(q, k, v, causal=causal)
        reference = _attention_and_grads(naive, q.float(), k.float(), v.float(), dout.float())
        lowprec = _attention_and_grads(naive, q, k, v, dout)
        for name, got, ref, low, factor in zip(names, ours, reference, lowprec, (2, 3, 3, 3)):
            assert_within_rule(f"{case} {name}", got, shard(ref), shard(low), factor)


def _check_ring_matches_one_process(rank, world_size):
    for layout in ("zigzag", "contiguous"):
        for causal in (False, True):
            for q_heads, kv_heads in ((2, 2), (2, 1)):
                for dtype in (torch.float32, torch.bfloat16):
                    _check_ring_case(None, layout, causal, q_heads, kv_heads, dtype)
    if world_size == 4:  # rings over subgroups whose ranks are not neighbours in the world
        evens, odds = dist.new_group([0, 2]), dist.new_group([1, 3])
        _check_ring_case(odds if rank % 2 else evens, "zigzag", True, 2, 1, torch.float32)


def _train_gpt(model, batches, shard, group):
    """Loss per step of a few SGD steps; with a group, the losses and gradients averaged over it."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for inputs, targets in batches:
        _, loss = model(shard(inputs), shard(targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss = loss.detach()
        if group is not None:  # each rank's loss is the mean over its shard, all shards the same size
            for t in [loss] + [p.grad for p in model.parameters()]:
                dist.all_reduce(t, group=group)
                t /= dist.get_world_size(group)
        optimizer.step()
        losses.append(loss.item())
    return losses


def _check_gpt_trains_as_on_one_process(rank, world_size):
    n = TOKENS_PER_RANK * world_size
    cfg = GPTConfig(vocab_size=32, block_size=n, n_layers=2, n_heads=2, d_model=32)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        tokens = torch.randint(0, cfg.vocab_size, (2, n + 1), generator=gen)
        batches.append((tokens[:, :-1], tokens[:, 1:]))
    torch.manual_seed(0)
    single = GPT(cfg, backend=BACKEND)
    expected_losses = _train_gpt(single, batches, lambda t: t, None)
    for layout in ("zigzag", "contiguous"):
        parallel = GPT(cfg, backend=BACKEND, context_parallel_group=dist.group.WORLD, context_parallel_layout=layout)
        torch.manual_seed(0)
        parallel.load_state_dict(GPT(cfg).state_dict())
        losses = _train_gpt(parallel, batches, lambda t: shard_sequence(t, rank, world_size, layout, dim=1),
                            dist.group.WORLD)
        torch.testing.assert_close(losses, expected_losses, rtol=1e-5, atol=1e-6)
        for (name, p), p_single in zip(parallel.named_parameters(), single.parameters()):
            torch.testing.assert_close(p, p_single, rtol=1e-4, atol=1e-5, msg=lambda m: f"{layout} {name}: {m}")


def _check_errors_with_a_group(rank, world_size):
    odd = torch.randn(1, 2, 15, HEAD_DIM)
    with pytest.raises(ValueError, match="layout='zigzag'.*length must be even"):
        ring_attention(odd, odd, odd)
    # Only rank 0 differs: every rank must raise (after one all_gather), none may hang in the ring.
    uneven = torch.randn(1, 2, 16 if rank == 0 else 8, HEAD_DIM)
    with pytest.raises(ValueError, match="same shapes and dtype on every rank"):
        ring_attention(uneven, uneven, uneven, layout="contiguous")
    one_odd = torch.randn(1, 2, 15 if rank == 0 else 16, HEAD_DIM)
    with pytest.raises(ValueError, match="same shapes and dtype on every rank"):
        ring_attention(one_odd, one_odd, one_odd)
    cross_lengths = torch.randn(1, 2, 8, HEAD_DIM)
    with pytest.raises(ValueError, match="k has 8 tokens but q has 16"):
        ring_attention(torch.randn(1, 2, 16, HEAD_DIM), cross_lengths, cross_lengths)


def _ranks(rank, world_size, init_file):
    torch.set_num_threads(1)  # W processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        _check_errors_with_a_group(rank, world_size)
        _check_ring_matches_one_process(rank, world_size)
        _check_gpt_trains_as_on_one_process(rank, world_size)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_ring_attention_on_gloo_processes(world_size, tmp_path):
    mp.start_processes(_ranks, args=(world_size, str(tmp_path / "rendezvous")), nprocs=world_size,
                       start_method=START_METHOD)


# ---- checks without a process group ---------------------------------------------------------------


def test_shard_sequence_picks_each_ranks_chunks():
    positions = torch.arange(16)
    zigzag = [shard_sequence(positions, r, 2, "zigzag", dim=0).tolist() for r in range(2)]
    assert zigzag == [[0, 1, 2, 3, 12, 13, 14, 15], [4, 5, 6, 7, 8, 9, 10, 11]]
    contiguous = [shard_sequence(positions, r, 4, "contiguous", dim=0).tolist() for r in range(4)]
    assert contiguous == [list(range(4 * r, 4 * r + 4)) for r in range(4)]


@pytest.mark.parametrize("call, error, match", [
    (lambda x: shard_sequence(x, 0, 4, "zigzag"), ValueError, "divisible by 8"),
    (lambda x: shard_sequence(x, 0, 3, "contiguous"), ValueError, "divisible by 3"),
    (lambda x: shard_sequence(x, 2, 2), ValueError, r"rank must be an int in \[0, 2\)"),
    (lambda x: shard_sequence(x, 0, 0), ValueError, "world_size must be a positive int"),
    (lambda x: shard_sequence(x, 0, 2, "striped"), ValueError, "layout must be one of"),
    (lambda x: ring_attention(x, x, x, layout="striped"), ValueError, "layout must be one of"),
    (lambda x: ring_attention(x, x, x, causal=1), TypeError, "causal must be a bool"),
])
def test_bad_arguments_raise_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call(torch.randn(1, 2, 4, HEAD_DIM))


def test_ring_attention_needs_an_initialized_process_group():
    assert not dist.is_initialized()
    x = torch.randn(1, 2, 4, HEAD_DIM)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        ring_attention(x, x, x)


@pytest.mark.parametrize("group_backend, device, match", [
    ("nccl", "cpu", "its backend nccl sends cuda tensors only, but q is on cpu: use a gloo group"),
    ("gloo", "cuda", "its backend gloo sends cpu tensors only, but q is on cuda: use an NCCL group"),
    ("cpu:gloo", "cuda", r"its backends \(cpu:gloo\) have none for cuda tensors"),
])
def test_a_group_that_cannot_send_the_tensors_device_is_refused(group_backend, device, match):
    with pytest.raises(ValueError, match=match):
        check_group_device(group_backend, torch.device(device))


@pytest.mark.parametrize("group_backend, device", [("gloo", "cpu"), ("nccl", "cuda"), ("cpu:gloo,cuda:nccl", "cpu"),
                                                   ("cpu:gloo,cuda:nccl", "cuda"), ("mpi", "cpu")])
def test_groups_that_can_send_the_tensors_device_pass(group_backend, device):
    check_group_device(group_backend, torch.device(device))


@pytest.mark.parametrize("options, match", [
    (dict(cross=True), "self-attention only"),
    (dict(window=(4, 0)), r"window must be \(-1, -1\)"),
    (dict(dropout=0.1), "dropout must be 0"),
    (dict(context_parallel_layout="striped"), "context_parallel_layout must be one of"),
])
def test_multi_head_attention_refuses_what_the_ring_cannot_do(options, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(32, 2, context_parallel_group=object(), **options)  # any group: checked first


def test_profiler_runs_the_ring_on_local_processes(tmp_path):
    from benchmarks import profile

    profile.main(["--world-size", "2", "--device", "cpu", "--start", "32", "--max-seqlen", "64", "--heads", "1",
                  "--head-dim", "16", "--modes", "fwd+bwd", "--ring-repeats", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "profile.json").read_text())
    assert sorted((r["rank"], r["seqlen"]) for r in rows) == [(0, 32), (0, 64), (1, 32), (1, 64)]
    assert all(r["status"] == "ok" and r["ms"] > 0 and r["peak_memory_mib"] > 0 for r in rows)
    assert "ring W=2 r1" in (tmp_path / "profile.txt").read_text()


@pytest.mark.parametrize("argv, match", [
    (["--world-size", "0"], "--world-size must be positive, got 0"),
    (["--world-size", "2", "--trace", "64"], "--trace does not go with --world-size"),
    (["--world-size", "2", "--modes", "bwd"], "with --world-size, fwd and fwd[+]bwd only"),
])
def test_profiler_ring_arguments(argv, match, capsys):
    from benchmarks import profile

    with pytest.raises(SystemExit):
        profile.main(argv)
    assert re.search(match, capsys.readouterr().err)


def test_multi_head_attention_refuses_a_padding_mask_context_parallel():
    layer = MultiHeadAttention(32, 2, context_parallel_group=object())
    with pytest.raises(ValueError, match="key_padding_mask must be None with context_parallel_group"):
        layer(torch.randn(1, 4, 32), key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
