"""Shared records of an injection: the target being adapted, and what apply_kasa reports per layer and in all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn


@dataclass
class Target:
    """One module to adapt, classified by the registry into a (format, placement) pair.

    shape: (m, n) of the whole weight (a sharded placement knows it from its spec); spec: the placement's own
    description (a TP ShardSpec) or None; correction: (left m×r, right r×n) when the format keeps its base and the
    layer subtracts the dropped tail in forward (QKaSA low_rank_correction).
    """

    name: str
    module: nn.Module
    format: Any
    placement: Any
    shape: tuple[int, int]
    spec: Any = None
    correction: Optional[tuple[torch.Tensor, torch.Tensor]] = None


@dataclass
class ExpertsTarget:
    """A fused experts module to adapt (kasa_ds.core.experts): its layout, the projections selected and the
    placement the registry gave its parameters."""

    name: str
    module: nn.Module
    layout: Any
    projections: tuple[str, ...]
    placement: Any


@dataclass
class AdapterTensor:
    """One trainable tensor of an adapter as io/ sees it: ``key`` (module path + parameter name, without PEFT's
    prefix), the parameter, and the KaSA layer holding it with the placement recorded there at injection (None for
    a modules_to_save parameter). The registry picks the placement that gathers and loads it."""

    key: str
    param: torch.nn.Parameter
    layer: Optional[nn.Module] = None
    name: str = ""  # the parameter's name inside ``layer`` (lora_A.weight, lora_B.weight, lora_diag)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, int]
    tail_energy: float  # fraction of ‖W‖²_F dropped by the truncation
    seconds: float


@dataclass
class KaSAReport:
    """What ``apply_kasa`` did: one row per adapted layer, parameter counts and time."""

    layers: list[LayerReport] = field(default_factory=list)
    modules_to_save: list[str] = field(default_factory=list)
    trainable_params: int = 0
    total_params: int = 0
    seconds: float = 0.0
    solver: str = "auto"
    #: (experts module, number of experts, projections adapted) per adapted fused experts module
    experts: list[tuple[str, int, tuple[str, ...]]] = field(default_factory=list)

    def __str__(self) -> str:
        energy = max((lr.tail_energy for lr in self.layers), default=0.0)
        linears = len(self.layers) - sum(len(p) for _, _, p in self.experts)
        what = [f"{linears} layers"] if linears or not self.experts else []
        if self.experts:
            what.append(f"{sum(e * len(p) for _, e, p in self.experts)} expert projections in {len(self.experts)} "
                        f"experts modules ({', '.join(self.experts[0][2])} of {self.experts[0][1]} experts each)")
        return (f"KaSA: adapted {' and '.join(what)} (solver={self.solver}, {self.seconds:.2f}s, max dropped "
                f"energy {energy:.2e}); trainable {self.trainable_params:,} / {self.total_params:,} params "
                f"({100 * self.trainable_params / max(self.total_params, 1):.3f}%)"
                + (f"; modules_to_save: {', '.join(self.modules_to_save)}" if self.modules_to_save else ""))
