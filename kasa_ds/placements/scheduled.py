"""Owner-scheduled truncation over a process group, for weights each rank holds whole (DDP, ZeRO ≤ 2) or as ZeRO-3
flat shards. Every rank runs the same steps in the same order:

    plan     every rank computes the same schedule (kasa_ds.comm.schedule): pieces of work sorted by SVD cost, each
             given an owner (least loaded first), cut into rounds in which no rank gathers more than
             ``max_gather_bytes``;
    gather   per round, the owner reads each of its pieces as float32 (a partitioned one is gathered to it alone;
             the round's gathers all start at once and move while the owners solve); non-owners hold nothing extra;
    solve    owners run the tail solver on each piece as it arrives, concurrently (the work is spread, not repeated);
    share    each owner broadcasts the thin factors (left m×r, right r×n), never the weight;
    apply    every rank applies them through the format (rewrite what it holds, or keep a correction).

A piece of work is a :class:`Job`: one linear's weight (:class:`LinearJob`), or one fused experts parameter over a
range of experts (:class:`ExpertRangeJob`, every selected projection in it, each expert by its own tail). The owner
computes exactly what one process would: results do not depend on the world size.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Protocol

import torch

from ..config import KaSAConfig
from ..core.experts import expert_tails, parameter_name, projection_view
from ..core.truncation import tail_factors
from ..core.types import ExpertsTarget, LayerReport, Target
from ..comm.collectives import broadcast_from_owner, comm_device, rank, world_size
from ..comm.schedule import DEFAULT_MAX_GATHER_BYTES, WorkItem, assign_owners
from ..progress import progress


class Job(Protocol):
    """One piece of scheduled truncation work, the same object on every rank."""

    item: WorkItem

    def start_read(self, owner: Optional[int], group) -> Callable[[], Optional[torch.Tensor]]:
        """Begin bringing the weights to ``owner`` (collective); the function returns them there, None elsewhere.
        ``owner`` None: this process alone solves, with no communication (weights it holds whole)."""

    def solve(self, weights: torch.Tensor, config: KaSAConfig) -> tuple[list[torch.Tensor], float]:
        """On the owner: the thin factors (float32, of :meth:`factor_shapes`) and the largest dropped energy."""

    def factor_shapes(self, r: int) -> list[tuple[int, ...]]:
        """The shapes of what :meth:`solve` returns (every rank knows them without communication)."""

    def apply(self, factors: list[torch.Tensor], config: KaSAConfig) -> None:
        """W ← W_world on what this rank holds, from the owner's factors."""


class LinearJob:
    """One target linear's weight (m×n): read through its placement, rewritten through its format."""

    def __init__(self, target: Target) -> None:
        self.target = target
        w = target.module.weight
        self.item = WorkItem(target.name, target.shape, w.element_size() * getattr(w, "ds_numel", w.numel()))

    def start_read(self, owner: int, group):
        return self.target.placement.start_read_on_owner(self.target, owner, group)

    def solve(self, weights: torch.Tensor, config: KaSAConfig):
        tail = tail_factors(weights, config.r, config.svd_solver)
        return [tail.left, tail.right], tail.tail_energy

    def factor_shapes(self, r: int):
        m, n = self.target.shape
        return [(m, r), (r, n)]

    def apply(self, factors, config: KaSAConfig) -> None:
        left, right = factors
        self.target.format.apply_tail(self.target, left, right, config, self.target.placement.subtract)


class ExpertRangeJob:
    """Experts ``first`` … ``stop − 1`` of one fused parameter (``parameter``: gate_up_proj, up_proj or down_proj)
    of an experts module, for the selected ``projections`` it holds; the placement reads the range (E', A, B) in
    the parameter's layout and subtracts what the factors say (left (E', m, r), right (E', r, n) per projection)."""

    def __init__(self, target: ExpertsTarget, parameter: str, projections: tuple[str, ...], first: int,
                 stop: int) -> None:
        self.target, self.parameter, self.projections, self.first, self.stop = (target, parameter, projections,
                                                                                  first, stop)
        self.item = WorkItem(f"{target.name}.{parameter}[{first}:{stop}]", target.layout.shape(projections[0]),
                             expert_bytes(target, parameter) * (stop - first), (stop - first) * len(projections))

    def start_read(self, owner: int, group):
        return self.target.placement.start_read_experts(self.target, self.parameter, self.first, self.stop, owner,
                                                        group)

    def solve(self, weights: torch.Tensor, config: KaSAConfig):
        factors, energy = [], 0.0
        for p in self.projections:
            left, right, dropped = expert_tails(projection_view(weights, self.target.layout, p), config.r,
                                                config.svd_solver, f"{self.target.name}.{p}")
            factors += [left, right]
            energy = max(energy, dropped)
        return factors, energy

    def factor_shapes(self, r: int):
        count = self.stop - self.first
        shapes = []
        for p in self.projections:
            m, n = self.target.layout.shape(p)
            shapes += [(count, m, r), (count, r, n)]
        return shapes

    def apply(self, factors, config: KaSAConfig) -> None:
        tails = {p: (factors[2 * i], factors[2 * i + 1]) for i, p in enumerate(self.projections)}
        self.target.placement.subtract_experts(self.target, self.parameter, self.first, tails)


def expert_bytes(target: ExpertsTarget, parameter: str) -> int:
    """The bytes one expert takes in the fused ``parameter`` as stored (every projection it holds)."""
    stored = getattr(target.module, parameter)
    return stored.element_size() * sum(math.prod(target.layout.shape(p)) for p in target.layout.projections()
                                       if parameter_name(target.layout, p) == parameter)


def expert_range_jobs(targets: list[ExpertsTarget], world: int, max_gather_bytes: int) -> list[ExpertRangeJob]:
    """Each selected fused parameter of each target cut into ranges of experts: at most ``max_gather_bytes`` per
    range (one expert at least) and at least ``world`` ranges where there are enough experts, so every rank solves."""
    jobs = []
    for t in targets:
        for parameter in dict.fromkeys(parameter_name(t.layout, p) for p in t.projections):
            selected = tuple(p for p in t.projections if parameter_name(t.layout, p) == parameter)
            experts = t.layout.num_experts
            step = max(1, min(max_gather_bytes // expert_bytes(t, parameter), math.ceil(experts / world)))
            jobs += [ExpertRangeJob(t, parameter, selected, e, min(e + step, experts)) for e in range(0, experts, step)]
    return jobs


def run_scheduled(jobs: list[Job], config: KaSAConfig, *, group=None,
                  max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES, show_progress: bool = True,
                  desc: str = "KaSA truncation", unit: str = "layer", spread: bool = True) -> list[tuple[float, float]]:
    """Plan, gather, solve, share and apply ``jobs`` over all ranks of ``group`` (default: the world); per job
    (largest dropped energy, owner's solve seconds), on every rank. Collective: call on every rank, same jobs.
    ``spread=False``: this process solves everything it holds itself, with no communication (rounds still bound
    what it reads at once)."""
    me, world = (rank(group), world_size(group)) if spread else (0, 1)
    assignments = assign_owners([j.item for j in jobs], world, max_gather_bytes)
    results: list[Optional[tuple[float, float]]] = [None] * len(jobs)
    bar = progress(total=len(jobs), desc=f"{desc} ({world} ranks)", unit=unit, disable=not (show_progress and me == 0))
    for rnd in sorted({a.round for a in assignments}):
        batch = [(a.index, a.owner) for a in assignments if a.round == rnd]  # same order on every rank
        # every read of the round started first (collectives in the same order on every rank), then finished in
        # that order: an owner solves a piece as soon as it has arrived, while the round's later reads move
        reads = [(i, jobs[i].start_read(owner if spread else None, group)) for i, owner in batch]
        solved = {}
        for i, finish in reads:  # owners solve concurrently, each its own pieces
            weights = finish()
            if weights is None:
                continue
            tic = time.perf_counter()
            factors, energy = jobs[i].solve(weights, config)
            solved[i] = [*factors, torch.tensor([energy, time.perf_counter() - tic])]
            del weights
        reads.clear()
        for i, owner in batch:
            *factors, meta = (broadcast_from_owner(solved.pop(i, None), [*jobs[i].factor_shapes(config.r), (2,)],
                                                   owner, group, dtype=torch.float32, device=comm_device())
                              if spread else solved.pop(i))
            jobs[i].apply(factors, config)
            results[i] = (meta[0].item(), meta[1].item())
            bar.update(1)
    bar.close()
    return results


def work_items(targets: list[Target]) -> list[WorkItem]:
    """One item per target; its bytes: what the owner gathers (the stored weight: packed, for a 4-bit base)."""
    return [LinearJob(t).item for t in targets]


def truncate_scheduled(targets: list[Target], config: KaSAConfig, *, group=None,
                       max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES,
                       show_progress: bool = True) -> list[LayerReport]:
    """Step 2 of ``apply_kasa`` over all ranks of ``group`` (default: the world). Collective: call on every rank."""
    results = run_scheduled([LinearJob(t) for t in targets], config, group=group, max_gather_bytes=max_gather_bytes,
                            show_progress=show_progress)
    return [LayerReport(t.name, t.shape, energy, seconds) for t, (energy, seconds) in zip(targets, results)]


def truncate_experts_scheduled(targets: list[ExpertsTarget], config: KaSAConfig, *, group=None,
                               max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES, show_progress: bool = True,
                               spread: bool = True) -> list[LayerReport]:
    """Every selected projection of every expert ← its W_world, owner-scheduled per (fused parameter, range of
    experts); one LayerReport per (module, projection): the largest dropped energy of its experts, the solve
    seconds of its ranges. Collective (``spread``): call on every rank, same targets."""
    jobs = expert_range_jobs(targets, world_size(group) if spread else 1, max_gather_bytes)
    results = run_scheduled(jobs, config, group=group, max_gather_bytes=max_gather_bytes,
                            show_progress=show_progress, desc="KaSA experts", unit="expert range", spread=spread)
    reports = {}
    for job, (energy, seconds) in zip(jobs, results):
        for p in job.projections:
            name = f"{job.target.name}.{p}"
            before = reports.get(name, LayerReport(name, job.target.layout.shape(p), 0.0, 0.0))
            reports[name] = LayerReport(name, before.shape, max(before.tail_energy, energy),
                                        before.seconds + seconds / len(job.projections))
    return [reports[f"{t.name}.{p}"] for t in targets for p in t.projections]
