"""Tensor-parallel truncation, shared by the megatron-core and DeepSpeed AutoTP integrations (see .spec).

Truncation without gathering W (:func:`truncate_tensor_parallel`). For a column-parallel weight
WᵀW = Σ_i W_iᵀW_i, so one reduce of the n×n Gram over the TP group gives the right tail basis V_t (n×r), and
each rank rewrites its own rows: W_i ← W_i − (W_i V_t) V_tᵀ. A row-parallel weight is the same on Wᵀ: WWᵀ = Σ_i
W_i W_iᵀ (m×m), W_i ← W_i − U_t (U_tᵀ W_i). Grams are reduced in float64 (so the owner can refine a float32 eigh,
see :func:`kasa_ds.core.truncation.gram_tail_basis`); communication per weight is that Gram plus the d×r basis, and no
rank ever holds more of W than its shard. Where the Gram would be larger than the whole weight (the unsplit dimension
exceeds the split one, e.g. a column-parallel k/v projection with 1024 rows and 8192 columns), the shards are gathered
to the owner instead and the single-process solver runs there.

Bytes (tools/bench_tp_init.py, TP=2, against gathering float32 shards to one rank, SVD there, scattering back):
the Gram path sends 1.7× fewer for 1:3.5 weights but 2× more for square ones, and since every non-owner sends a
whole d×d Gram while shards shrink as 1/t, its byte advantage fades as t grows. What it always buys is memory (no
rank holds more than its shard plus one Gram), the Gram FLOPs split over the TP group, and an eigh of the small
Gram instead of a full SVD (1.6–4.7× faster there).

The work is spread: each weight gets one owner among all (data-parallel replica, TP rank) pairs, least loaded
first; only the owner's replica reduces that weight's Gram, only the owner solves it, and the basis is broadcast.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from ...config import KaSAConfig
from ...core.truncation import gram_tail_basis, tail_factors
from ...core.types import LayerReport, Target
from ...comm.collectives import broadcast_from_owner, gather_to_owner
from ...comm.schedule import WorkItem, assign_owners
from ...progress import progress
from .spec import ShardSpec, local_rows, subtract_local


@dataclass
class _Layout:
    """Where every rank of the stage sits: (dp index, tp index) → its global rank and its rank in ``group`` (the
    ranks holding this pipeline stage: the whole world without pipeline parallelism)."""

    dp_rank: int
    tp_rank: int
    dp_size: int
    tp_size: int
    global_rank: dict
    group_rank: dict
    group: Optional[dist.ProcessGroup]

    @classmethod
    def discover(cls, spec: ShardSpec, dp_group) -> "_Layout":
        group = spec.stage_group
        world = dist.get_world_size(group)
        tp_size = spec.tp_size
        dp_size = dist.get_world_size(dp_group) if dp_group is not None else 1
        if dp_size * tp_size != world:
            raise ValueError(f"tensor-parallel KaSA truncation needs a stage of data-parallel × tensor-parallel ranks "
                             f"(got {world} ≠ {dp_size} × {tp_size}); context parallelism is not supported")
        dp_rank = dist.get_rank(dp_group) if dp_group is not None else 0
        pairs = [None] * world
        dist.all_gather_object(pairs, (dp_rank, spec.tp_rank, dist.get_rank()), group=group)
        return cls(dp_rank, spec.tp_rank, dp_size, tp_size, {(d, t): g for d, t, g in pairs},
                   {(d, t): i for i, (d, t, _) in enumerate(pairs)}, group)


def use_gram(spec: ShardSpec) -> bool:
    """Reduce the Gram (unsplit dim d: d² values) unless it holds more values than the whole weight (m·n)."""
    m, n = spec.full_shape
    unsplit = n if spec.dim == 0 else m
    return unsplit * unsplit <= m * n


def truncate_tensor_parallel(targets: list[Target], config: KaSAConfig, *,
                             show_progress: bool = True) -> list[LayerReport]:
    """Step 2 of ``apply_kasa`` for TP targets (``Target.spec`` set). Collective over the whole world (= data-parallel
    × TP ranks): call on every rank, with the same targets in the same order. Returns a LayerReport per target."""
    if not targets:
        return []
    layout = _Layout.discover(targets[0].spec, targets[0].spec.dp_group)
    items = [WorkItem(t.name, t.spec.full_shape, 0) for t in targets]
    slots = assign_owners(items, layout.dp_size * layout.tp_size, max_gather_bytes=1 << 62)  # s = dp·tp_size + tp
    bar = progress(total=len(targets), desc=f"KaSA TP truncation ({layout.tp_size}-way TP, {layout.dp_size} DP)",
                   unit="layer", disable=not (show_progress and dist.get_rank() == 0))
    reports = []
    # one weight at a time: its reduce (owner's replica), solve (owner) and broadcast (all ranks) in the same order
    # everywhere. Owners in different replicas overlap their solves with the other replicas' reduces.
    for target, assignment in zip(targets, slots):
        owner_dp, owner_tp = divmod(assignment.owner, layout.tp_size)
        owner = layout.global_rank[(owner_dp, owner_tp)]
        tic = time.perf_counter()
        with torch.no_grad():
            solve = _truncate_by_gram if use_gram(target.spec) else _truncate_by_gather
            energy = solve(target, config, layout, owner_dp, owner_tp, owner)
        reports.append(LayerReport(target.name, target.spec.full_shape, energy, time.perf_counter() - tic))
        bar.update()
    bar.close()
    return reports


def _truncate_by_gram(target: Target, config: KaSAConfig, layout: _Layout, owner_dp: int, owner_tp: int,
                      owner: int) -> float:
    """Σ_i W_iᵀW_i (d×d, float64) reduced to the owner, which solves it; every rank rewrites its rows with the basis."""
    spec, weight = target.spec, target.module.weight
    local = local_rows(weight, spec).to(torch.float64)
    solved = None
    if layout.dp_rank == owner_dp:
        gram = local.T @ local  # (d, d): this shard's part of the Gram
        if spec.tp_size > 1:
            dist.reduce(gram, dst=owner, group=spec.group)
        if dist.get_rank() == owner:
            basis, energy = gram_tail_basis(gram, config.r, config.svd_solver)
            solved = (basis, torch.tensor([energy], dtype=torch.float64))
    d = local.shape[1]
    basis, energy = broadcast_from_owner(solved, [(d, config.r), (1,)], layout.group_rank[(owner_dp, owner_tp)],
                                         group=layout.group, device=weight.device)
    subtract_local(weight, spec, (local @ basis) @ basis.T)
    return energy.item()


def _truncate_by_gather(target: Target, config: KaSAConfig, layout: _Layout, owner_dp: int, owner_tp: int,
                        owner: int) -> float:
    """The shards gathered to the owner (when the Gram would exceed the weight), solved whole, factors broadcast."""
    spec, weight = target.spec, target.module.weight
    rows = local_rows(weight, spec)
    solved = None
    if layout.dp_rank == owner_dp:
        full = rows if spec.tp_size == 1 else gather_to_owner(rows, owner_tp, spec.group, sizes=spec.sizes)
        if dist.get_rank() == owner:
            tail = tail_factors(full, config.r, config.svd_solver)
            solved = (tail.left, tail.right, torch.tensor([tail.tail_energy]))
    total, d = sum(spec.sizes), rows.shape[1]
    left, right, energy = broadcast_from_owner(solved, [(total, config.r), (config.r, d), (1,)],
                                               layout.group_rank[(owner_dp, owner_tp)], group=layout.group,
                                               device=weight.device)
    subtract_local(weight, spec, left[spec.local_slice()] @ right)
    return energy.item()

