"""Weights held whole by this rank: one process, DDP, DeepSpeed ZeRO ≤ 2 (replicated on every rank)."""

from __future__ import annotations

import time
from typing import Optional

import torch
from torch import nn

from ..config import KaSAConfig
from ..core.experts import projection_weight
from ..core.layer import KaSALinear
from ..core.truncation import tail_factors
from ..core.types import ExpertsTarget, LayerReport, Target
from ..comm.collectives import is_distributed, is_rank_zero, rank, world_size
from ..comm.schedule import DEFAULT_MAX_GATHER_BYTES
from ..progress import progress
from .base import Placement, kasa_linear
from .scheduled import truncate_experts_scheduled, truncate_scheduled


class LocalPlacement(Placement):
    name = "local"

    def describe(self, module: nn.Module, name: str):
        return ((module.out_features, module.in_features), None) if isinstance(module, nn.Linear) else None

    def truncate(self, targets: list[Target], config: KaSAConfig, *, show_progress: bool = True,
                 distributed: bool = False, max_gather_bytes: int = 0) -> list[LayerReport]:
        """In this process on the weights' devices; ``distributed`` (every rank calling, weights replicated): the
        solves are spread over the ranks and the factors broadcast."""
        if distributed and is_distributed() and world_size() > 1:
            return truncate_scheduled(targets, config, max_gather_bytes=max_gather_bytes, show_progress=show_progress)
        reports = []
        bar_off = not (show_progress and is_rank_zero())
        for t in progress(targets, desc="KaSA truncation", unit="layer", disable=bar_off):
            if t.module.weight.device.type == "meta":
                raise ValueError(f"{t.name}: weight is on the meta device; load the weights before apply_kasa")
            tic = time.perf_counter()
            with torch.no_grad():
                tail = tail_factors(t.format.read(t.module), config.r, config.svd_solver)
                t.format.apply_tail(t, tail.left, tail.right, config, self.subtract)
            reports.append(LayerReport(t.name, t.shape, tail.tail_energy, time.perf_counter() - tic))
        return reports

    def truncate_experts(self, targets: list[ExpertsTarget], config: KaSAConfig, *, show_progress: bool = True,
                         distributed: bool = False, max_gather_bytes: int = 0) -> list[LayerReport]:
        """Each expert's projection by its own r smallest triplets, W_world written into the fused parameter
        through its view; ``distributed`` (every rank calling, weights replicated): the ranges of experts are
        spread over the ranks and the factors broadcast."""
        for t in targets:
            if t.module.down_proj.device.type == "meta":
                raise ValueError(f"{t.name}: weights are on the meta device; load the weights before apply_kasa")
        spread = distributed and is_distributed() and world_size() > 1
        cap = max_gather_bytes or DEFAULT_MAX_GATHER_BYTES
        return truncate_experts_scheduled(targets, config, max_gather_bytes=cap,
                                          show_progress=show_progress, spread=spread)

    def start_read_experts(self, target: ExpertsTarget, parameter: str, first: int, stop: int, owner, group):
        """A slice of the parameter this rank holds whole (no communication)."""
        mine = owner is None or rank(group) == owner
        weights = getattr(target.module, parameter)[first:stop].detach().float() if mine else None
        return lambda: weights

    @torch.no_grad()
    def subtract_experts(self, target: ExpertsTarget, parameter: str, first: int, tails) -> None:
        for p, (left, right) in tails.items():
            view = projection_weight(target.module, target.layout, p)
            for e in range(left.shape[0]):
                subtract_(view[first + e], left[e].to(view.device), right[e].to(view.device))

    @torch.no_grad()
    def sample_experts(self, target: ExpertsTarget, projection: str, positions: torch.Tensor) -> torch.Tensor:
        view = projection_weight(target.module, target.layout, projection)
        return view.reshape(-1, view.shape[-1]).flatten()[positions.to(view.device)].float().cpu()

    def read_on_owner(self, target: Target, owner: int, group) -> Optional[torch.Tensor]:
        """The float32 weight on ``owner`` (every rank holds it; no communication), None elsewhere."""
        return target.format.read(target.module) if rank(group) == owner else None

    def sample_weight(self, target: Target, positions: torch.Tensor, group=None) -> torch.Tensor:
        """Read where it is held: every rank holds the weight, no communication."""
        if target.module.weight.device.type == "meta":
            raise ValueError(f"{target.name}: weight is on the meta device; load the weights before apply_kasa")
        return target.format.sample(target.module, positions)

    def holds_tensor(self, param: torch.Tensor) -> bool:
        """Every tensor no placement before this one claims (the registry asks in order)."""
        return True

    def subtract(self, target: Target, left: torch.Tensor, right: torch.Tensor) -> None:
        subtract_(target.module.weight, left, right)

    def wrap(self, target: Target, config: KaSAConfig) -> KaSALinear:
        return kasa_linear(target, config)


@torch.no_grad()
def subtract_(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> None:
    """W ← W − left·right in place (W: a weight or a view of one), computed in the factors' precision (float32 or
    float64) and rounded once to W's dtype."""
    if weight.dtype == left.dtype == right.dtype and weight.device == left.device and weight.dim() == 2:
        weight.addmm_(left, right, alpha=-1)  # one pass, no m×n temporary
        return
    delta = (left @ right).to(weight.device)
    weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))


LOCAL = LocalPlacement()
