"""Tensor-parallel autograd mappings with megatron-core's semantics, on torch.distributed alone (gloo or NCCL).

Each name says both directions, as in ``megatron.core.tensor_parallel.mappings``:
    copy_to_tp_region       forward identity          backward all-reduce
    reduce_from_tp_region   forward all-reduce        backward identity
    gather_last_dim         forward all-gather (last) backward keep this rank's slice
    split_last_dim          forward keep my slice     backward all-gather
``sizes`` are the split dimension's size on each rank of ``group``, in rank order (uneven splits allowed).
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


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def gather_last_dim(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    return _GatherLastDim.apply(x, tuple(sizes), group)


def split_last_dim(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    return _SplitLastDim.apply(x, tuple(sizes), group)
