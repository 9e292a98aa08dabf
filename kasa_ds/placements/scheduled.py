"""Owner-scheduled truncation over a process group, for weights each rank holds whole (DDP, ZeRO ≤ 2) or as ZeRO-3
flat shards. Every rank runs the same steps in the same order:

    plan     every rank computes the same schedule (kasa_ds.comm.schedule): weights sorted by SVD cost, each given
             an owner (least loaded first), cut into rounds in which no rank gathers more than ``max_gather_bytes``;
    gather   per round, the owner reads each of its weights as float32 (a partitioned one is gathered to it alone;
             the round's gathers all start at once and move while the owners solve); non-owners hold nothing extra;
    solve    owners run the tail solver on each weight as it arrives, concurrently (the work is spread, not repeated);
    share    each owner broadcasts the thin factors (left m×r, right r×n), never the weight;
    apply    every rank applies them through the format (rewrite what it holds, or keep a correction).

The owner computes exactly what one process would: results do not depend on the world size.
"""

from __future__ import annotations

import time

import torch

from ..config import KaSAConfig
from ..core.truncation import tail_factors
from ..core.types import LayerReport, Target
from ..comm.collectives import broadcast_from_owner, comm_device, rank, world_size
from ..comm.schedule import DEFAULT_MAX_GATHER_BYTES, WorkItem, assign_owners
from ..progress import progress


def work_items(targets: list[Target]) -> list[WorkItem]:
    """One item per target; its bytes: what the owner gathers (the stored weight: packed, for a 4-bit base)."""
    return [WorkItem(t.name, t.shape, t.module.weight.element_size() * getattr(t.module.weight, "ds_numel",
                                                                              t.module.weight.numel()))
            for t in targets]


def truncate_scheduled(targets: list[Target], config: KaSAConfig, *, group=None,
                       max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES,
                       show_progress: bool = True) -> list[LayerReport]:
    """Step 2 of ``apply_kasa`` over all ranks of ``group`` (default: the world). Collective: call on every rank."""
    me, world = rank(group), world_size(group)
    assignments = assign_owners(work_items(targets), world, max_gather_bytes)
    reports: dict[str, LayerReport] = {}
    bar = progress(total=len(targets), desc=f"KaSA truncation ({world} ranks)", unit="layer",
                   disable=not (show_progress and me == 0))
    for rnd in sorted({a.round for a in assignments}):
        batch = [(targets[a.index], a.owner) for a in assignments if a.round == rnd]  # same order on every rank
        # every read of the round started first (collectives in the same order on every rank), then finished in
        # that order: an owner solves a weight as soon as it has arrived, while the round's later reads move
        reads = [(t.name, t.placement.start_read_on_owner(t, owner, group)) for t, owner in batch]
        solved = {}
        for name, finish in reads:  # owners solve concurrently, each its own weights
            weight = finish()
            if weight is None:
                continue
            tic = time.perf_counter()
            tail = tail_factors(weight, config.r, config.svd_solver)
            meta = torch.tensor([tail.tail_energy, time.perf_counter() - tic])
            solved[name] = (tail.left, tail.right, meta)
            del weight
        reads.clear()
        for target, owner in batch:
            m, n = target.shape
            left, right, meta = broadcast_from_owner(solved.pop(target.name, None), [(m, config.r), (config.r, n),
                                                     (2,)], owner, group, dtype=torch.float32, device=comm_device())
            target.format.apply_tail(target, left, right, config, target.placement.subtract)
            reports[target.name] = LayerReport(target.name, target.shape, meta[0].item(), meta[1].item())
            bar.update(1)
    bar.close()
    return [reports[t.name] for t in targets]
