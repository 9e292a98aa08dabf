"""The placement interface: what truncation, wrapping and saving need to know about where a weight lives.

A placement recognizes its modules and knows the whole weight's shape (:meth:`Placement.describe`), truncates a
list of its targets (collective where it is sharded), subtracts an owner's thin factors from what this rank holds,
picks the layer class that wraps the base, says whether the regularizer terms are computed inside forward, and
gathers the adapter's full-shape tensors for saving.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
from torch import nn

from ..config import KaSAConfig
from ..core.layer import KaSALinear
from ..core.types import LayerReport, Target


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

    @contextmanager
    def whole(self, target: Target) -> Iterator[bool]:
        """The target's weight held whole inside the block; yields whether this rank writes it (a weight held
        whole everywhere: every rank rewrites its own copy)."""
        yield True

    def gather_adapter(self, model: nn.Module, items: list[tuple[str, nn.Parameter]]) -> dict[str, torch.Tensor]:
        """{key: full-shape CPU tensor} for adapter ``items`` (key, parameter) on rank 0 at least; collective for
        sharded placements."""
        return {key: p.detach().to("cpu").contiguous() for key, p in items}


def kasa_linear(target: Target, config: KaSAConfig, **shard) -> KaSALinear:
    """The KaSALinear for a target with ``in_features``/``out_features`` (whole weight unless ``shard`` says)."""
    m, n = target.shape
    kwargs = dict(in_features=n, out_features=m, **shard)
    return KaSALinear(target.module, r=config.r, alpha=config.alpha, dropout=config.dropout, beta=config.beta,
                      gamma=config.gamma, adapter_dtype=getattr(torch, config.adapter_dtype), **kwargs)
