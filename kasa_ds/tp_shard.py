"""Tensor-parallel shard math for KaSA, shared by the megatron-core and DeepSpeed AutoTP integrations.

A tensor-parallel (TP) linear holds a shard of W (m×n) on each of the ``t`` ranks of its TP group:

    column-parallel (megatron ColumnParallelLinear, AutoTP LinearLayer):   rows split,    W_i is m_i × n
    row-parallel    (megatron RowParallelLinear,    AutoTP LinearAllreduce): columns split, W_i is m × n_i

Truncation without gathering W (:func:`truncate_tensor_parallel`). For a column-parallel weight
WᵀW = Σ_i W_iᵀW_i, so one reduce of the n×n Gram over the TP group gives the right tail basis V_t (n×r), and
each rank rewrites its own rows: W_i ← W_i − (W_i V_t) V_tᵀ. A row-parallel weight is the same on Wᵀ: WWᵀ = Σ_i
W_i W_iᵀ (m×m), W_i ← W_i − U_t (U_tᵀ W_i). Grams are reduced in float64 (so the owner can refine a float32 eigh,
see :func:`kasa_ds.truncation.gram_tail_basis`); communication per weight is that Gram plus the d×r basis, and no rank
ever holds more of W than its shard. Where the Gram would be larger than the whole weight (the unsplit dimension
exceeds the split one, e.g. a column-parallel k/v projection with 1024 rows and 8192 columns), the shards are
gathered to the owner instead and the single-process solver runs there.

Bytes (tools/bench_tp_init.py, TP=2, against gathering float32 shards to one rank, SVD there, scattering back):
the Gram path sends 1.7× fewer for 1:3.5 weights but 2× more for square ones, and since every non-owner sends a
whole d×d Gram while shards shrink as 1/t, its byte advantage fades as t grows. What it always buys is memory (no
rank holds more than its shard plus one Gram), the Gram FLOPs split over the TP group, and an eigh of the small
Gram instead of a full SVD (1.6–4.7× faster there).

The work is spread: each weight gets one owner among all (data-parallel replica, TP rank) pairs, least loaded
first; only the owner's replica reduces that weight's Gram, only the owner solves it, and the basis is broadcast.

Adapters follow the base sharding (:class:`kasa_ds.tp_layer.KaSAParallelLinear`): column-parallel → ΔU (lora_B)
split on its rows, ΔVᵀ (lora_A) and ΔΣ replicated; row-parallel → ΔVᵀ split on its columns, ΔU and ΔΣ replicated.
The autograd mappings below are megatron's (copy/reduce/gather/scatter), written on torch.distributed alone so
either integration can use them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from .truncation import check_rank, gram_tail_basis, tail_factors
from .utils import progress


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

    @property
    def tp_size(self) -> int:
        return len(self.sizes)

    @property
    def tp_rank(self) -> int:
        return dist.get_rank(self.group) if self.tp_size > 1 else 0

    def local_slice(self, tp_rank: Optional[int] = None) -> slice:
        rank = self.tp_rank if tp_rank is None else tp_rank
        start = sum(self.sizes[:rank])
        return slice(start, start + self.sizes[rank])


# ---- autograd mappings (megatron-core's semantics) --------------------------------------------------------------

class _CopyToRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient over the TP group (input used by every shard)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromRegion(torch.autograd.Function):
    """All-reduce forward (sum of per-shard partials); identity backward (every rank uses the same sum)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class _GatherLastDim(torch.autograd.Function):
    """All-gather along the last dimension (shards of ``sizes``); backward keeps this rank's slice of the grad."""

    @staticmethod
    def forward(ctx, x, spec: ShardSpec):
        ctx.spec = spec
        parts = [x.new_empty(*x.shape[:-1], s) for s in spec.sizes]
        dist.all_gather(parts, x.contiguous(), group=spec.group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, g):
        return g[..., ctx.spec.local_slice()].contiguous(), None


class _SplitLastDim(torch.autograd.Function):
    """This rank's slice of the last dimension; backward all-gathers the grad."""

    @staticmethod
    def forward(ctx, x, spec: ShardSpec):
        ctx.spec = spec
        return x[..., spec.local_slice()].contiguous()

    @staticmethod
    def backward(ctx, g):
        return _GatherLastDim.apply(g, ctx.spec), None


def copy_to_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _CopyToRegion.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromRegion.apply(x, group)


def gather_last_dim(x: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    return _GatherLastDim.apply(x, spec)


def split_last_dim(x: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    return _SplitLastDim.apply(x, spec)


# ---- truncation -------------------------------------------------------------------------------------------------

@dataclass
class _Layout:
    """Where every rank sits: (dp index, tp index) → global rank, for the world that holds the model."""

    dp_rank: int
    tp_rank: int
    dp_size: int
    tp_size: int
    global_rank: dict

    @classmethod
    def discover(cls, spec: ShardSpec, dp_group) -> "_Layout":
        world = dist.get_world_size()
        tp_size = spec.tp_size
        dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        if dp_size * tp_size != world:
            raise ValueError(f"tensor-parallel KaSA truncation needs world = data-parallel × tensor-parallel ranks "
                             f"(got {world} ≠ {dp_size} × {tp_size}); pipeline or context parallelism is not supported")
        dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        pairs = [None] * world
        dist.all_gather_object(pairs, (dp_rank, spec.tp_rank))
        return cls(dp_rank, spec.tp_rank, dp_size, tp_size, {pair: g for g, pair in enumerate(pairs)})


def use_gram(spec: ShardSpec) -> bool:
    """Reduce the Gram (unsplit dim d: d² values) unless it holds more values than the whole weight (m·n)."""
    m, n = spec.full_shape
    unsplit = n if spec.dim == 0 else m
    return unsplit * unsplit <= m * n


def _local_t(weight: torch.Tensor, spec: ShardSpec) -> torch.Tensor:
    """The shard as a row shard of W (dim 0) or of Wᵀ (dim 1): (rows_i × d), a view."""
    return weight if spec.dim == 0 else weight.T


def truncate_tensor_parallel(targets, config, *, show_progress: bool = True):
    """Step 2 of ``apply_kasa`` for TP targets (``Target.spec`` set). Collective over the whole world (= data-parallel
    × TP ranks): call on every rank, with the same targets in the same order. Returns a LayerReport per target."""
    from .inject import LayerReport
    from .zero import WorkItem, plan

    if not targets:
        return []
    layout = _Layout.discover(targets[0].spec, targets[0].spec.dp_group)
    slots = layout.dp_size * layout.tp_size  # slot s = dp · tp_size + tp
    for t in targets:
        check_rank(config.r, t.spec.full_shape, t.name)
    items = [WorkItem(t.name, t.spec.full_shape, 0) for t in targets]
    owners = [a.owner for a in plan(items, slots, max_gather_bytes=1 << 62)]
    bar = progress(total=len(targets), desc=f"KaSA TP truncation ({layout.tp_size}-way TP, {layout.dp_size} DP)",
                   unit="layer", disable=not (show_progress and dist.get_rank() == 0))
    reports = []
    # one weight at a time: its reduce (owner's replica), solve (owner) and broadcast (all ranks) in the same order
    # everywhere. Owners in different replicas overlap their solves with the other replicas' reduces.
    for target, slot in zip(targets, owners):
        spec = target.spec
        owner_dp, owner_tp = divmod(slot, layout.tp_size)
        owner = layout.global_rank[(owner_dp, owner_tp)]
        weight = target.module.weight
        tic = time.perf_counter()
        with torch.no_grad():
            solved = None
            if use_gram(spec):
                local = _local_t(weight, spec).to(torch.float64)
                if layout.dp_rank == owner_dp:
                    gram = local.T @ local  # (d, d): this shard's part of the Gram
                    _reduce(gram, owner, spec.group, spec.tp_size)
                    if dist.get_rank() == owner:
                        solved = gram_tail_basis(gram, config.r, config.svd_solver)
                basis, energy = _broadcast_basis(solved, local.shape[1], config.r, owner, weight.device)
                local_t = _local_t(weight, spec)
                local_t.sub_(((local @ basis) @ basis.T).to(weight.dtype))
            else:
                full = _gather_rows(_local_t(weight, spec), spec, owner_tp) if layout.dp_rank == owner_dp else None
                if dist.get_rank() == owner:
                    tail = tail_factors(full, config.r, config.svd_solver)
                    solved = (tail.left.double(), tail.right.double(), tail.tail_energy)
                rows, d = sum(spec.sizes), _local_t(weight, spec).shape[1]
                left, right, energy = _broadcast_factors(solved, rows, d, config.r, owner, weight.device)
                _local_t(weight, spec).sub_((left[spec.local_slice()] @ right).to(weight.dtype))
        reports.append(LayerReport(target.name, spec.full_shape, energy, time.perf_counter() - tic))
        bar.update()
    bar.close()
    return reports


def _reduce(gram: torch.Tensor, owner: int, group, tp_size: int) -> None:
    if tp_size > 1:
        dist.reduce(gram, dst=owner, group=group)


def _gather_rows(local: torch.Tensor, spec: ShardSpec, owner_tp: int) -> Optional[torch.Tensor]:
    """The row shards of W (or Wᵀ) concatenated on the owner; None elsewhere."""
    if spec.tp_size == 1:
        return local
    mine = spec.tp_rank == owner_tp
    parts = [local.new_empty(s, local.shape[1]) for s in spec.sizes] if mine else None
    dst = dist.get_global_rank(spec.group, owner_tp) if spec.group is not None else owner_tp
    dist.gather(local.contiguous(), parts, dst=dst, group=spec.group)
    return torch.cat(parts) if mine else None


def _broadcast_basis(solved, d: int, r: int, owner: int, device) -> tuple[torch.Tensor, float]:
    buf = torch.empty(d * r + 1, dtype=torch.float64, device=device)
    if solved is not None:
        basis, energy = solved
        buf[:-1] = basis.reshape(-1)
        buf[-1] = energy
    dist.broadcast(buf, src=owner)
    return buf[:-1].view(d, r), buf[-1].item()


def _broadcast_factors(solved, rows: int, d: int, r: int, owner: int, device):
    buf = torch.empty(rows * r + r * d + 1, dtype=torch.float64, device=device)
    if solved is not None:
        left, right, energy = solved
        buf[:rows * r] = left.reshape(-1)
        buf[rows * r:-1] = right.reshape(-1)
        buf[-1] = energy
    dist.broadcast(buf, src=owner)
    return buf[:rows * r].view(rows, r), buf[rows * r:-1].view(r, d), buf[-1].item()


# ---- adapter state: TP shards ↔ one full (PEFT) adapter -----------------------------------------------------------

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
    dim = 0 if spec.dim == 0 else 1
    return full.index_select(dim, full_indices(spec, tp_rank).to(full.device)).contiguous()


def join_factor(parts: list[torch.Tensor], spec: ShardSpec) -> torch.Tensor:
    """The full factor in the TP=1 layout from the TP ranks' parts (inverse of :func:`split_factor`)."""
    dim = 0 if spec.dim == 0 else 1
    shape = list(parts[0].shape)
    shape[dim] = spec.full_shape[spec.dim]
    full = parts[0].new_empty(shape)
    for rank, part in enumerate(parts):
        full.index_copy_(dim, full_indices(spec, rank).to(part.device), part)
    return full


def tp_layers(model: torch.nn.Module):
    from .tp_layer import KaSAParallelLinear

    for name, module in model.named_modules():
        if isinstance(module, KaSAParallelLinear):
            yield name, module


def gathered_tp_adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole adapter (PEFT keys, full shapes, CPU) on every rank: each TP layer's sharded factor is all-gathered
    over its TP group (r × its split dimension per layer, never a base weight). Collective over every TP group."""
    from .adapter_io import PREFIX, adapter_state_dict

    state = adapter_state_dict(model)
    for name, layer in tp_layers(model):
        spec = layer.spec
        if spec.tp_size == 1:
            continue
        key = f"{PREFIX}{name}.{sharded_factor(spec)}"
        local = layer.get_parameter(sharded_factor(spec)).detach().contiguous()
        shape = lambda size: (size, layer.r) if spec.dim == 0 else (layer.r, size)  # noqa: E731
        parts = [local.new_empty(shape(s)) for s in spec.sizes]
        dist.all_gather(parts, local, group=spec.group)
        state[key] = join_factor(parts, spec).cpu()
    return state


def tp_layout(model: torch.nn.Module) -> dict[str, dict]:
    """Per TP layer: split dim, full weight shape and split sizes (how to cut a full adapter for these shards)."""
    return {name: {"dim": layer.spec.dim, "full_shape": list(layer.spec.full_shape), "sizes": list(layer.spec.sizes),
                   "chunks": layer.spec.chunks}
            for name, layer in tp_layers(model)}
