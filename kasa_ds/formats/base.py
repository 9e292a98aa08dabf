"""The format interface: what truncation, merging and saving need to know about how a base weight is stored.

A format reads the weight as float32, applies the dropped tail (rewrite it, or keep a low-rank correction the layer
subtracts in forward), builds the merged plain linear, and describes itself for ``kasa_ds_config.json``. Where the
weight lives across ranks is the placement's business (:mod:`kasa_ds.placements`): a rewrite is handed the
placement's ``subtract`` so that each rank changes only what it holds.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..config import KaSAConfig
from ..core.layer import KaSALinear
from ..core.types import Target

Subtract = Callable[[Target, torch.Tensor, torch.Tensor], None]


class Format:
    """Defaults are those of a dense float weight; subclasses override what differs."""

    name = "dense"

    def matches(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def read(self, module: nn.Module, stored: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The (m×n) float32 weight the module computes with; ``stored``: the whole stored weight when a partitioned
        placement gathered it (default: the module's own)."""
        return (module.weight if stored is None else stored).detach().float()

    def keeps_base(self, config: KaSAConfig) -> bool:
        """True: the base is left untouched and the layer subtracts the tail in forward (a correction)."""
        return False

    def apply_tail(self, target: Target, left: torch.Tensor, right: torch.Tensor, config: KaSAConfig,
                   subtract: Subtract) -> None:
        """Make ``target`` compute W − left·right: record a correction, or rewrite the stored weight."""
        if self.keeps_base(config):
            target.correction = (left.float(), right.float())
        else:
            self.rewrite(target, left, right, subtract)

    def rewrite(self, target: Target, left: torch.Tensor, right: torch.Tensor, subtract: Subtract) -> None:
        subtract(target, left, right)

    def merged_linear(self, layer: KaSALinear) -> nn.Module:
        """A plain module computing (W_world + ΔW) x: the base itself, merged in place."""
        layer.merge()
        return layer.base_layer

    def metadata(self, module: nn.Module, model: nn.Module) -> Optional[dict]:
        """What ``kasa_ds_config.json`` records as ``base_quantization`` (None: a float base)."""
        return None
