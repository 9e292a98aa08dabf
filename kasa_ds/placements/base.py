"""The placement interface: every operation truncation, wrapping, saving and loading need about where a weight lives.

A placement recognizes its modules and knows the whole weight's shape (:meth:`Placement.describe`); for truncation
it brings a weight to its owner (:meth:`~Placement.read_on_owner`), truncates a list of its targets (collective where
it is sharded) and subtracts an owner's thin factors from what this rank holds; it picks the layer class that wraps
the base and says whether the regularizer terms are computed inside forward; for io/ it gathers the adapter's
full-shape tensors (:meth:`~Placement.gather_adapter`) and cuts a full-shape tensor to what this rank holds
(:meth:`~Placement.load_adapter_tensor`). io/, the scheduler and the exports call only these; the registry alone
decides which placement a target or tensor has.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from ..comm.collectives import broadcast_from_owner, comm_device, is_distributed
from ..config import KaSAConfig
from ..core.experts import KaSAExperts
from ..core.layer import KaSALinear
from ..core.types import AdapterTensor, ExpertsTarget, LayerReport, Target


class Placement(ABC):
    name = "local"
    #: adapter parameters are partitioned outside forward: each term of the regularizer is computed in forward
    regularize_in_forward = False

    @abstractmethod
    def describe(self, module: nn.Module, name: str) -> Optional[tuple[tuple[int, int], Any]]:
        """((m, n) of the whole weight, placement spec) if this placement holds ``module``, else None."""

    @abstractmethod
    def truncate(self, targets: list[Target], config: KaSAConfig, *, show_progress: bool = True,
                 distributed: bool = False, max_gather_bytes: int = 0) -> list[LayerReport]:
        """W ← W_world for every target (collective for sharded placements: every rank, same targets, same order)."""

    @abstractmethod
    def subtract(self, target: Target, left: torch.Tensor, right: torch.Tensor) -> None:
        """W ← W − left·right on what this rank holds (left m×r, right r×n of the whole weight)."""

    @abstractmethod
    def wrap(self, target: Target, config: KaSAConfig) -> KaSALinear:
        """The KaSA layer that holds ``target.module`` as its base."""

    @abstractmethod
    def read_on_owner(self, target: Target, owner: int, group) -> Optional[torch.Tensor]:
        """The whole weight (m×n, float32, in the unsharded layout) on ``owner``, None on the other ranks; collective
        for a sharded placement. ``owner`` is a rank of ``group``, the group the weight is spread over (None: the
        world). Used by the owner-scheduled truncation (:mod:`kasa_ds.placements.scheduled`)."""

    def start_read_on_owner(self, target: Target, owner: int, group) -> Callable[[], Optional[torch.Tensor]]:
        """:meth:`read_on_owner` begun: a function that finishes it (every rank calls it, in the order started). A
        placement whose read is one collective starts it without waiting, so that the reads of a scheduling round
        move while the owners solve; by default the read happens here and the function returns it."""
        weight = self.read_on_owner(target, owner, group)
        return lambda: weight

    def truncate_experts(self, targets: list[ExpertsTarget], config: KaSAConfig, *, show_progress: bool = True,
                         distributed: bool = False, max_gather_bytes: int = 0) -> list[LayerReport]:
        """Every selected projection of every expert ← its W_world (kasa_ds.core.experts); one LayerReport per
        (module, projection). Placements that do not hold experts never get one (the registry refuses first)."""
        raise RuntimeError(f"the {self.name} placement holds no experts: the registry refuses them before truncation")

    def start_read_experts(self, target: ExpertsTarget, parameter: str, first: int, stop: int, owner: Optional[int],
                           group) -> Callable[[], Optional[torch.Tensor]]:
        """The read of experts ``first`` … ``stop − 1`` of the fused ``parameter``, begun: a function giving them
        (stop − first, A, B) as float32 in the parameter's layout on ``owner`` (None: this process, no
        communication), None elsewhere (kasa_ds.placements.scheduled.ExpertRangeJob)."""
        raise RuntimeError(f"the {self.name} placement holds no experts: the registry refuses them before truncation")

    def subtract_experts(self, target: ExpertsTarget, parameter: str, first: int,
                         tails: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """W_e ← W_e − left_e·right_e, for each projection's (left (E', m, r), right (E', r, n)) of experts
        ``first`` …, on what this rank holds of the fused ``parameter``."""
        raise RuntimeError(f"the {self.name} placement holds no experts: the registry refuses them before truncation")

    def wrap_experts(self, target: ExpertsTarget, config: KaSAConfig) -> KaSAExperts:
        """The KaSAExperts that holds ``target.module`` as its base."""
        return KaSAExperts(target.module, target.layout, target.projections, config.r, config.alpha, config.dropout,
                           config.beta, config.gamma, getattr(torch, config.adapter_dtype))

    def sample_experts(self, target: ExpertsTarget, projection: str, positions: torch.Tensor) -> torch.Tensor:
        """The float32 values at flat ``positions`` of ``projection``'s weights, all experts stacked ((E·m) × n), on
        every rank (kasa_ds.core.fingerprint)."""
        raise RuntimeError(f"the {self.name} placement holds no experts: the registry refuses them before sampling")

    def sample_weight(self, target: Target, positions: torch.Tensor, group=None) -> torch.Tensor:
        """The float32 values of the whole weight at flat ``positions``, on every rank (kasa_ds.core.fingerprint).
        By default the weight is brought whole to rank 0 of ``group`` and the values broadcast; collective where
        the placement is sharded."""
        whole = self.read_on_owner(target, 0, group)
        mine = [whole.flatten()[positions.to(whole.device)]] if whole is not None else None
        device = comm_device() if is_distributed() else None
        return broadcast_from_owner(mine, [tuple(positions.shape)], 0, group, dtype=torch.float32,
                                    device=device)[0].cpu()

    def holding_device(self, target: Target) -> torch.device:
        """Where this rank holds (its part of) the target's weight: factors are moved there before subtracting."""
        return target.module.weight.device

    def full_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        """The whole shape of a tensor this placement holds (a partition knows the shape it was cut from)."""
        return tuple(param.shape)

    def whole_numels(self, model: nn.Module) -> dict[int, int]:
        """{id(tensor): element count of the unsplit tensor} for the tensors of ``model`` this placement holds split
        in a way their own shape does not say (tensor parallelism); {} by default. The same on every rank."""
        return {}

    def holds_tensor(self, param: torch.Tensor) -> bool:
        """Whether this placement holds ``param`` by its storage alone (a partition, say), whatever layer recorded
        it; a placement known only through its layers (tensor parallelism) says False."""
        return False

    @contextmanager
    def whole(self, target: Target) -> Iterator[bool]:
        """The target's weight held whole inside the block; yields whether this rank writes it (a weight held
        whole everywhere: every rank rewrites its own copy)."""
        yield True

    def gather_adapter(self, items: list[AdapterTensor]) -> dict[str, torch.Tensor]:
        """{key: full-shape CPU tensor} for adapter ``items`` on rank 0 at least; collective for sharded placements
        (every rank passes the same items in the same order)."""
        return {item.key: item.param.detach().to("cpu").contiguous() for item in items}

    def load_adapter_tensor(self, item: AdapterTensor, value: torch.Tensor) -> torch.Tensor:
        """The part of the full-shape ``value`` this rank holds for ``item`` (all of it where the tensor is whole)."""
        return value


def kasa_linear(target: Target, config: KaSAConfig, **shard) -> KaSALinear:
    """The KaSALinear for a target with ``in_features``/``out_features`` (whole weight unless ``shard`` says)."""
    m, n = target.shape
    kwargs = dict(in_features=n, out_features=m, **shard)
    return KaSALinear(target.module, r=config.r, alpha=config.alpha, dropout=config.dropout, beta=config.beta,
                      gamma=config.gamma, adapter_dtype=getattr(torch, config.adapter_dtype), **kwargs)
