"""Context-parallel (ring) attention on torch.distributed: one sequence sharded across the ranks of a group.

Each rank holds its shard (B, H, N / W, D) of q, k and v. The K/V shards travel a ring: at step s rank r
holds the K/V of rank (r - s) mod W, runs the fused kernel of its backend on its queries against them,
and merges the partial result into its running one by log-sum-exp (``attention.merge``), while the next
shard is already on its way (``batch_isend_irecv`` posted before the kernel runs). The backward runs
the same ring: each rank computes the gradients of one K/V block from the global o and lse, keeps the
dq part and passes the dk/dv accumulator along with the block, so that after W steps it reaches the
block's owner. K/V travel with their own Hkv heads (grouped-query attention is never expanded).

Layouts (how the sequence of N tokens is cut into the ranks' shards):
- ``"contiguous"``: rank r holds tokens [r N/W, (r + 1) N/W). Under causal masking the last rank sees
  every earlier shard and the first sees only its own, so the ranks' work differs by up to W times.
- ``"zigzag"``: the sequence is cut into 2W chunks and rank r holds chunks r and 2W - 1 - r, one early and
  one late, so that under causal masking every rank does the same work: against an earlier rank's
  shard all its queries see that shard's first chunk; against a later rank's shard only its second
  chunk's queries see anything, and they see all of it. Both are unmasked blocks; only the diagonal
  (a rank's own shard) is causal, with Nq == Nk.

``shard_sequence`` cuts a full tensor into a rank's shard and ``gather_sequence`` puts the shards back.
Communication: NCCL for CUDA tensors, gloo for CPU tensors (gloo's point-to-point sends read host memory).
"""
import torch
import torch.distributed as dist

from .api import autocast_inputs
from .backends import select_backend
from .merge import merge_two
from .validation import AttentionOptions, check_bool, resolve_scale, validate_inputs

LAYOUTS = ("zigzag", "contiguous")

# The device types each process-group backend can move with point-to-point sends. Backends not listed
# (mpi, ucc, third-party ones) are trusted to know their devices.
P2P_DEVICES = {"nccl": ("cuda",), "gloo": ("cpu",)}


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def _chunks(rank, world_size, layout):
    """(number of equal chunks the sequence is cut into, the chunks rank holds, in order)."""
    if layout == "zigzag":
        return 2 * world_size, (rank, 2 * world_size - 1 - rank)
    return world_size, (rank,)


def shard_sequence(x, rank, world_size, layout="zigzag", dim=2):
    """Rank ``rank``'s shard of the full sequence ``x`` along ``dim`` (2 for (B, H, N, D), 1 for (B, N, C),
    0 for positions): a view for "contiguous", a copy of two chunks for "zigzag". x.shape[dim] must be
    divisible by 2 x world_size (zigzag) or world_size (contiguous)."""
    _check_layout(layout)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    n_chunks, mine = _chunks(rank, world_size, layout)
    length = x.shape[dim]
    if length % n_chunks:
        raise ValueError(f"x has {length} positions along dim {dim}: layout={layout!r} over {world_size} ranks cuts "
                         f"the sequence into {n_chunks} equal chunks, so it must be divisible by {n_chunks}")
    chunk = length // n_chunks
    parts = [x.narrow(dim, c * chunk, chunk) for c in mine]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def gather_sequence(x, group=None, layout="zigzag", dim=2):
    """The full sequence from every rank's shard ``x`` (the inverse of ``shard_sequence``), on every rank:
    one all_gather. Not differentiable: for outputs, checks and logging."""
    _check_layout(layout)
    world_size = dist.get_world_size(group)
    shards = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(shards, x.contiguous(), group=group)
    n_chunks, _ = _chunks(0, world_size, layout)
    chunks = [None] * n_chunks
    for rank, shard in enumerate(shards):
        _, mine = _chunks(rank, world_size, layout)
        for c, part in zip(mine, shard.chunk(len(mine), dim)):
            chunks[c] = part
    return torch.cat(chunks, dim)


def check_group_device(group_backend, device):
    """Raise unless a process group whose backend is ``group_backend`` (``dist.get_backend``'s answer:
    "nccl", "gloo", or a per-device list like "cpu:gloo,cuda:nccl") can send tensors on ``device``."""
    per_device = dict(entry.split(":", 1) for entry in group_backend.split(",")) if ":" in group_backend else None
    name = per_device.get(device.type) if per_device is not None else group_backend
    if name is None:
        raise ValueError(f"group: its backends ({group_backend}) have none for {device.type} tensors, and q is on "
                         f"{device}")
    devices = P2P_DEVICES.get(name)
    if devices is not None and device.type not in devices:
        fix = "an NCCL group for CUDA tensors" if device.type == "cuda" else "a gloo group for CPU tensors"
        raise ValueError(f"group: its backend {name} sends {' or '.join(devices)} tensors only, but q is on "
                         f"{device}: use {fix}")


class _Ring:
    """The ranks of a group in a ring: each sends to the next and receives from the previous."""

    def __init__(self, group):
        self.group = group
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.next = dist.get_global_rank(group, (self.rank + 1) % self.world_size)
        self.prev = dist.get_global_rank(group, (self.rank - 1) % self.world_size)

    def pass_on(self, outgoing):
        """Posts sending ``outgoing`` to the next rank and receiving its twin from the previous one;
        returns (the receive buffer, the works to wait on). A ring of one rank hands ``outgoing`` to itself."""
        if self.world_size == 1:
            return outgoing, []
        incoming = torch.empty_like(outgoing)
        works = dist.batch_isend_irecv([dist.P2POp(dist.isend, outgoing, self.next, self.group),
                                        dist.P2POp(dist.irecv, incoming, self.prev, self.group)])
        return incoming, works

    def source(self, step):
        """The rank whose K/V shard this rank holds at ``step``."""
        return (self.rank - step) % self.world_size


def _block(layout, causal, rank, source, n):
    """Which of this rank's queries attend to which keys of ``source``'s shard, and whether causally:
    (query rows, key rows, causal), or None where no query of this rank sees any of those keys."""
    everything = slice(None)
    if not causal:
        return everything, everything, False
    if source == rank:  # the diagonal: the shard's positions increase, so plain causal (Nq == Nk) is right
        return everything, everything, True
    if layout == "contiguous":
        return (everything, everything, False) if source < rank else None
    half = n // 2
    if source < rank:  # its early chunk precedes both of ours; its late chunk follows both
        return everything, slice(0, half), False
    return slice(half, None), everything, False  # only our late chunk comes after its two chunks


def _rows(t, rows):
    return t[:, :, rows]


def _ring_forward(q, k, v, options, backend, ring, layout):
    """(o in q's dtype, lse float32) of this rank's queries against the whole sequence."""
    kv = torch.stack((k, v))  # one contiguous buffer per hop: K and V share their shape
    o = lse = None
    for step in range(ring.world_size):
        last = step == ring.world_size - 1
        if not last:
            incoming, works = ring.pass_on(kv)
        block = _block(layout, options.causal, ring.rank, ring.source(step), q.shape[2])
        if block is not None:
            rows, cols, causal = block
            o_block, lse_block = backend.forward(_rows(q, rows), _rows(kv[0], cols), _rows(kv[1], cols),
                                                 _block_options(options, causal))
            if o is None:  # step 0, the diagonal block, covers every row
                o, lse = o_block.float(), lse_block
            else:
                o[:, :, rows], lse[:, :, rows] = merge_two(_rows(o, rows), _rows(lse, rows), o_block, lse_block)
        if not last:
            for work in works:
                work.wait()
            kv = incoming
    return o.to(q.dtype), lse


def _ring_backward(dout, q, k, v, o, lse, options, backend, ring, layout):
    """(dq, dk, dv) of this rank's shard; dk and dv come home after a full turn of the ring."""
    kv = torch.stack((k, v))
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dkv_works = None
    for step in range(ring.world_size):
        last = step == ring.world_size - 1
        if not last:
            incoming, kv_works = ring.pass_on(kv)
        block = _block(layout, options.causal, ring.rank, ring.source(step), q.shape[2])
        grads = None
        if block is not None:
            rows, cols, causal = block
            grads = backend.backward(_rows(dout, rows), _rows(q, rows), _rows(kv[0], cols), _rows(kv[1], cols),
                                     _rows(o, rows), _rows(lse, rows).contiguous(), _block_options(options, causal))
            dq[:, :, rows] += grads[0]
        # The accumulated dK/dV of the block in hand, from the ranks it visited before this one.
        if dkv_works is None:
            dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        else:
            for work in dkv_works:
                work.wait()
            dkv = dkv_incoming
        if grads is not None:
            dkv[0][:, :, cols] += grads[1]
            dkv[1][:, :, cols] += grads[2]
            grads = None  # freed before the next receive buffer is allocated: a lower peak per rank
        dkv_incoming, dkv_works = ring.pass_on(dkv)  # after the last step: to the block's owner
        if not last:
            for work in kv_works:
                work.wait()
            kv = incoming
    for work in dkv_works:
        work.wait()
    return dq.to(q.dtype), dkv_incoming[0].to(k.dtype), dkv_incoming[1].to(v.dtype)


def _block_options(options, causal):
    return options if options.causal == causal else AttentionOptions(causal=causal,
                                                                      softmax_scale=options.softmax_scale)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, options, backend, ring, layout):
        o, lse = _ring_forward(q, k, v, options, backend, ring, layout)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.options, ctx.backend, ctx.ring, ctx.layout = options, backend, ring, layout
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(dout.contiguous(), q, k, v, o, lse, ctx.options, ctx.backend, ctx.ring,
                                    ctx.layout)
        return dq, dk, dv, None, None, None, None


def _check_shapes_agree(q, k, group):
    """One all_gather of (B, Hq, Hkv, N, D, dtype) so that every rank raises, not only the odd one out."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    mine = torch.tensor([*q.shape, k.shape[1], dtypes.index(q.dtype)], device=q.device)
    everyone = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, mine, group=group)
    shapes = [tuple(t.tolist()) for t in everyone]
    if len(set(shapes)) > 1:
        described = "; ".join(f"rank {r}: q {s[:4]}, {s[4]} KV heads, {dtypes[s[5]]}" for r, s in enumerate(shapes))
        raise ValueError(f"q, k, v must have the same shapes and dtype on every rank of the group (each holds an "
                         f"equal shard of one sequence), got {described}")


def ring_attention(q, k, v, causal=False, softmax_scale=None, group=None, layout="zigzag", backend="auto",
                   return_lse=False):
    """Attention over one sequence sharded across the ranks of ``group`` (default: the world).

    q (B, Hq, N / W, D), k and v (B, Hkv, N / W, D) are this rank's shard of the sequence, cut by
    ``shard_sequence(x, rank, W, layout)``; the result is this rank's shard of
    ``flash_attention(q_full, k_full, v_full, causal, softmax_scale)``, in the same layout, with gradients
    to q, k and v. ``causal`` is the mask of the whole sequence (query i sees keys j <= i). ``layout`` is
    "zigzag" (balanced work under causal masking; N divisible by 2W) or "contiguous" (N divisible by W).
    ``backend`` picks the kernels of each block as for ``flash_attention``. With ``return_lse`` also
    returns this rank's rows of the float32 log-sum-exp (B, Hq, N / W), without gradient. Every rank of
    the group must call it with the same shapes and options; NCCL groups take CUDA tensors, gloo groups
    CPU tensors. Under autocast q, k and v are cast as ``flash_attention`` casts them.
    """
    _check_layout(layout)
    check_bool("causal", causal)
    q, k, v = autocast_inputs(q, k, v)
    validate_inputs(q, k, v)
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k has {k.shape[2]} tokens but q has {q.shape[2]}: ring attention is self-attention over "
                         f"one sharded sequence, each rank holding the same positions of q, k and v")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("group: torch.distributed is not initialized: call torch.distributed.init_process_group "
                           "first (or use attention.flash_attention on one process)")
    group = dist.group.WORLD if group is None else group
    check_group_device(dist.get_backend(group), q.device)
    _check_shapes_agree(q, k, group)  # first: the checks after it then fail on every rank or on none
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"q has {q.shape[2]} tokens on this rank: layout='zigzag' holds two equal chunks per rank "
                         f"(the sequence cut into 2 x world_size), so each shard's length must be even")
    options = AttentionOptions(causal=causal, softmax_scale=resolve_scale(softmax_scale, None, q.shape[-1]))
    chosen = select_backend(q, k, v, options, backend)
    if chosen.backward is None and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(f"backend={chosen.name!r} has no backward of a block of keys, which ring attention's "
                           f"backward needs")
    o, lse = _RingAttention.apply(q, k, v, options, chosen, _Ring(group), layout)
    return (o, lse) if return_lse else o
