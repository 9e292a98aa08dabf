"""Tensor-parallel autograd mappings with megatron-core's semantics, on torch.distributed alone (gloo or NCCL).

Each name says both directions, as in ``megatron.core.tensor_parallel.mappings``:
    copy_to_tp_region       forward identity          backward all-reduce
    reduce_from_tp_region   forward all-reduce        backward identity
    gather_last_dim         forward all-gather (last) backward keep this rank's slice
    split_last_dim          forward keep my slice     backward all-gather
    gather_first_dim        forward all-gather (dim 0) backward reduce-scatter (dim 0)
    reduce_scatter_first_dim forward reduce-scatter (dim 0) backward all-gather (dim 0)
``sizes`` are the split dimension's size on each rank of ``group``, in rank order (uneven splits allowed). The
first-dim pair is megatron's sequence-parallel region ([s, b, h] tensors split evenly on s): a tensor whose first
dimension is split over the ranks becomes whole and back.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from .collectives import all_gather_uneven


def local_slice(sizes: Sequence[int], group) -> slice:
    """This rank's slice of a dimension split into ``sizes`` over ``group``."""
    me = dist.get_rank(group)
    start = sum(sizes[:me])
    return slice(start, start + sizes[me])


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.clone(memory_format=torch.contiguous_format)  # never reduce the caller's gradient tensor in place
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return torch.cat(all_gather_uneven(x, sizes, x.dim() - 1, group), dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g[..., local_slice(ctx.sizes, ctx.group)].contiguous(), None, None


class _SplitLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return x[..., local_slice(sizes, group)].contiguous()

    @staticmethod
    def backward(ctx, g):
        return _GatherLastDim.apply(g, ctx.sizes, ctx.group), None, None


# torch ≥ 2.13 names it reduce_scatter_single (reduce_scatter_tensor warns there); earlier releases have only the latter
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather_first(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    out = x.new_empty((x.shape[0] * dist.get_world_size(group), *x.shape[1:]))
    dist.all_gather_into_tensor(out, x, group=group)
    return out


def _reduce_scatter_first(x: torch.Tensor, group) -> torch.Tensor:
    x = x.contiguous()
    world = dist.get_world_size(group)
    if x.shape[0] % world:
        raise ValueError(f"reduce-scatter: the first dimension ({x.shape[0]}) must divide by the group's {world} "
                         "ranks")
    out = x.new_empty((x.shape[0] // world, *x.shape[1:]))
    _REDUCE_SCATTER(out, x, group=group)
    return out


class _FirstDim(torch.autograd.Function):
    """The sequence-parallel pair: forward all-gathers (``gather``) or reduce-scatters dim 0, backward the other."""

    @staticmethod
    def forward(ctx, x, group, gather: bool):
        ctx.group, ctx.gather = group, gather
        return (_all_gather_first if gather else _reduce_scatter_first)(x, group)

    @staticmethod
    def backward(ctx, g):
        return (_reduce_scatter_first if ctx.gather else _all_gather_first)(g, ctx.group), None, None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def gather_last_dim(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    return _GatherLastDim.apply(x, tuple(sizes), group)


def split_last_dim(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    return _SplitLastDim.apply(x, tuple(sizes), group)


def gather_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[s/t, …] on each of the t ranks → [s, …] (rank order); backward sums the ranks' gradients and keeps mine."""
    return _FirstDim.apply(x, group, True)


def reduce_scatter_first_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[s, …] partial sums on each rank → my [s/t, …] of their sum; backward all-gathers the gradient."""
    return _FirstDim.apply(x, group, False)
