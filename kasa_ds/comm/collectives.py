"""Rank queries, the two owner collectives every distributed truncation uses, and two packed collectives.

    gather_to_owner      the shards of one tensor, concatenated on the owner rank only (None elsewhere);
                         start_gather_to_owner starts it without waiting
    broadcast_from_owner a few tensors the owner computed, packed in one buffer, received by every rank
    all_gather_uneven    every rank's shard on every rank, shards of different lengths allowed (padded on the wire:
                         gloo and NCCL all-gather equal sizes only)
    all_reduce_mean      many tensors averaged over the group in place, packed into a few buffers (one collective per
                         bucket, not one per tensor)

Ranks passed here are ranks *within* ``group`` (None: the world); the global rank torch needs for ``src``/``dst``
is looked up once, in :func:`global_rank`.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    """This process's rank in ``group`` (the launcher's RANK before the process group exists)."""
    if is_distributed():
        return dist.get_rank(group)
    return int(os.environ.get("RANK", 0))


def world_size(group=None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def is_rank_zero() -> bool:
    return rank() == 0


def global_rank(group, group_rank: int) -> int:
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def comm_device() -> torch.device:
    """Where collectives must run: the current accelerator for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_to_owner(shard: torch.Tensor, owner: int, group=None,
                    sizes: Optional[Sequence[int]] = None) -> Optional[torch.Tensor]:
    """Every rank's ``shard`` concatenated along dim 0 on ``owner`` (group rank); None on the others. Collective.

    ``sizes``: each rank's dim-0 length when they differ (default: all equal to this rank's).
    """
    return start_gather_to_owner(shard, owner, group, sizes)()


def start_gather_to_owner(shard: torch.Tensor, owner: int, group=None,
                          sizes: Optional[Sequence[int]] = None) -> Callable[[], Optional[torch.Tensor]]:
    """:func:`gather_to_owner` started without waiting: returns the function that waits for it and gives its result
    (call it on every rank; keep ``shard`` unchanged until then). Collective: every rank starts the same gathers in
    the same order."""
    if world_size(group) == 1:
        return lambda: shard
    mine = rank(group) == owner
    lengths = sizes or [shard.shape[0]] * world_size(group)
    parts = [shard.new_empty(n, *shard.shape[1:]) for n in lengths] if mine else None
    send = shard.contiguous()
    work = dist.gather(send, parts, dst=global_rank(group, owner), group=group, async_op=True)

    def finish() -> Optional[torch.Tensor]:
        work.wait()  # ``send`` is held by this closure until here
        assert send is not None
        return torch.cat(parts) if mine else None

    return finish


def broadcast_from_owner(tensors: Optional[Sequence[torch.Tensor]], shapes: Sequence[tuple[int, ...]], owner: int,
                         group=None, dtype: torch.dtype = torch.float64,
                         device: Optional[torch.device] = None) -> list[torch.Tensor]:
    """The owner's ``tensors`` (of ``shapes``) on every rank, sent as one packed buffer of ``dtype``. Collective.

    ``tensors`` is read on the owner only (pass None elsewhere); every rank passes the same shapes.
    """
    numels = [int(torch.Size(s).numel()) for s in shapes]
    buf = torch.empty(sum(numels), dtype=dtype, device=device)
    if tensors is not None:
        torch.cat([t.reshape(-1).to(buf) for t in tensors], out=buf)
    if world_size(group) > 1:
        dist.broadcast(buf, src=global_rank(group, owner), group=group)
    return [part.view(shape) for part, shape in zip(buf.split(numels), shapes)]


def all_gather_uneven(shard: torch.Tensor, sizes: Sequence[int], dim: int, group=None) -> list[torch.Tensor]:
    """Every rank's shard (rank r's has length ``sizes[r]`` along ``dim``), on every rank, in rank order.

    Shards are padded to the longest along ``dim`` for the collective and trimmed after. Not differentiable by
    itself; :mod:`kasa_ds.comm.mappings` wraps it."""
    longest = max(sizes)
    pad = list(shard.shape)
    pad[dim] = longest - shard.shape[dim]
    padded = torch.cat([shard, shard.new_zeros(pad)], dim=dim) if pad[dim] else shard
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return [part.narrow(dim, 0, n) for part, n in zip(parts, sizes)]


DEFAULT_BUCKET_BYTES = 256 << 20


def all_reduce_mean(tensors: Sequence[torch.Tensor], group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> None:
    """Average ``tensors`` (same dtype and device; e.g. the adapters' gradients) over ``group`` in place. They are
    packed in order into buckets of at most ``bucket_bytes`` (a larger tensor is a bucket of its own), one all-reduce
    each: a step's hundreds of adapter tensors cost a few collectives. Collective: every rank passes the same shapes
    in the same order."""
    world = world_size(group)
    if world == 1 or not tensors:
        return
    buckets, size = [[]], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if buckets[-1] and size + nbytes > bucket_bytes:
            buckets.append([])
            size = 0
        buckets[-1].append(t)
        size += nbytes
    for bucket in buckets:
        flat = torch.cat([t.reshape(-1) for t in bucket])
        dist.all_reduce(flat, group=group)
        flat /= world
        for t, part in zip(bucket, flat.split([t.numel() for t in bucket])):
            t.copy_(part.view_as(t))
