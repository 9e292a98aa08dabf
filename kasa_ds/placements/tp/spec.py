"""ShardSpec: how one tensor-parallel linear's weight is split, and the factor split/join between TP and TP=1 layouts.

    column-parallel (megatron ColumnParallelLinear, AutoTP LinearLayer):     dim 0, rows split,    W_i is m_i × n
    row-parallel    (megatron RowParallelLinear,    AutoTP LinearAllreduce): dim 1, columns split, W_i is m × n_i
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ...comm.mappings import local_slice


@dataclass
class ShardSpec:
    """How one TP linear's weight is split.

    dim: 0 = rows (column-parallel), 1 = columns (row-parallel); full_shape: (m, n) of the unsplit weight;
    sizes: the split dimension's size on each TP rank, in TP-rank order; group: the TP group;
    input_is_parallel (row-parallel): the layer receives its input already split (else it scatters it);
    gather_output (column-parallel): the layer all-gathers its output; dp_group: the data-parallel group;
    chunks: the unsplit dimension is this many equal blocks, each split over the TP ranks (megatron's GLU linear_fc1
    is [gate; up]: rank i holds [gate_i; up_i]), so rank-order concatenation is not the TP=1 layout.
    """

    dim: int
    full_shape: tuple[int, int]
    sizes: tuple[int, ...]
    group: Optional[dist.ProcessGroup]
    input_is_parallel: bool = True
    gather_output: bool = False
    returns_bias: bool = False  # megatron layers return (output, bias)
    dp_group: Optional[dist.ProcessGroup] = None  # ranks holding the same shard (data-parallel replicas)
    chunks: int = 1
    #: one projection of a fused column-parallel linear (kasa_ds.placements.tp.fused): which rows of the local
    #: weight shard are this projection's, in its own row order (None: the whole shard)
    rows: Optional[torch.Tensor] = None
    #: the ranks that hold this layer's pipeline stage (DP × TP ranks of one stage; None: the whole world): the
    #: truncation's schedule and broadcasts run over it
    stage_group: Optional[dist.ProcessGroup] = None
    #: megatron's sequence parallelism: the layer's input (column-parallel) or output (row-parallel) is split over
    #: the TP ranks on its first (sequence) dimension
    sequence_parallel: bool = False

    @property
    def tp_size(self) -> int:
        return len(self.sizes)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.group) if self.tp_size > 1 else 0

    def local_slice(self) -> slice:
        """This rank's slice of the split dimension in rank order."""
        return local_slice(self.sizes, self.group) if self.tp_size > 1 else slice(0, self.sizes[0])


def local_rows(weight: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """The shard as a row shard of W (dim 0) or of Wᵀ (dim 1): (rows_i × d); a view, or a copy for a projection of
    a fused linear (write through :func:`subtract_local`)."""
    if spec.rows is not None:
        return weight.index_select(0, spec.rows.to(weight.device))
    return weight if spec.dim == 0 else weight.T


@torch.no_grad()
def subtract_local(weight: torch.Tensor, spec: ShardSpec, delta: torch.Tensor) -> None:
    """weight's shard (in the :func:`local_rows` layout) −= delta, in place."""
    delta = delta.to(weight.device, weight.dtype)
    if spec.rows is not None:
        weight.index_add_(0, spec.rows.to(weight.device), delta, alpha=-1)
    else:
        local_rows(weight, spec).sub_(delta)


def sharded_factor(spec: ShardSpec) -> str:
    """The adapter factor split like the base: lora_B (ΔU, rows) for column-parallel, lora_A (ΔVᵀ, cols) for row."""
    return "lora_B.weight" if spec.dim == 0 else "lora_A.weight"


def full_indices(spec: ShardSpec, tp_rank: int) -> torch.Tensor:
    """Where TP rank ``tp_rank``'s rows (dim 0) / columns (dim 1) sit in the unsplit TP=1 weight."""
    full = spec.full_shape[spec.dim]
    block, part = full // spec.chunks, spec.sizes[tp_rank] // spec.chunks
    start = sum(spec.sizes[:tp_rank]) // spec.chunks
    return torch.cat([torch.arange(c * block + start, c * block + start + part) for c in range(spec.chunks)])


def split_factor(full: torch.Tensor, spec: ShardSpec, tp_rank: int) -> torch.Tensor:
    """This TP rank's part of a full factor: lora_B (m×r) rows for dim 0, lora_A (r×n) columns for dim 1."""
    return full.index_select(spec.dim, full_indices(spec, tp_rank).to(full.device)).contiguous()


def join_factor(parts: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The full factor in the TP=1 layout from the TP ranks' parts (inverse of :func:`split_factor`)."""
    shape = list(parts[0].shape)
    shape[spec.dim] = spec.full_shape[spec.dim]
    full = parts[0].new_empty(shape)
    for rank, part in enumerate(parts):
        full.index_copy_(spec.dim, full_indices(spec, rank).to(part.device), part)
    return full
