"""The format interface: what truncation, merging and saving need to know about how a base weight is stored.

A format reads the weight as float32, applies the dropped tail (rewrite it, or keep a low-rank correction the layer
subtracts in forward), builds the merged plain linear, and describes itself for ``kasa_ds_config.json``. Where the
weight lives across ranks is the placement's business (:mod:`kasa_ds.placements`): a rewrite is handed the
placement's ``subtract`` so that each rank changes only what it holds.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable, Optional

import torch
from torch import nn

from ..config import KaSAConfig
from ..core.layer import KaSALinear
from ..core.types import Target

Subtract = Callable[[Target, torch.Tensor, torch.Tensor], None]


class Format(ABC):
    """Defaults are those of a dense float weight; subclasses say what they match and override what differs."""

    name = "dense"

    @abstractmethod
    def matches(self, module: nn.Module) -> bool:
        """Whether ``module``'s weight is stored in this format."""

    def read(self, module: nn.Module, stored: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The (m×n) float32 weight the module computes with; ``stored``: the whole stored weight when a partitioned
        placement gathered it (default: the module's own)."""
        return (module.weight if stored is None else stored).detach().float()

    def sample(self, module: nn.Module, positions: torch.Tensor) -> torch.Tensor:
        """The float32 values the module computes with at flat ``positions`` of its (whole, held) weight."""
        return module.weight.detach().flatten()[positions.to(module.weight.device)].float().cpu()

    def sample_dtype(self, module: nn.Module) -> str:
        """What the sampled values were held in, for kasa_ds.core.fingerprint (a dtype, or a quantization's name)."""
        return str(module.weight.dtype).removeprefix("torch.")

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


class QuantizedFormat(Format):
    """A frozen quantized base (bitsandbytes 4-bit, 8-bit): read dequantized and in place only (a gathered weight
    would need its quantization state); kept with a correction (``quant_mode: low_rank_correction``) or requantized;
    merged into a float nn.Linear. Subclasses give :meth:`dequantize`, :meth:`requantize` and the merged dtype."""

    @abstractmethod
    def dequantize(self, module: nn.Module) -> torch.Tensor:
        """The (m×n) float32 weight the layer computes with."""

    @abstractmethod
    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        """Replace the layer's weight by ``weight`` (m×n) quantized with the layer's own settings."""

    def merged_dtype(self, module: nn.Module) -> torch.dtype:
        return torch.float32

    def read(self, module: nn.Module, stored: Optional[torch.Tensor] = None) -> torch.Tensor:
        if stored is not None:
            raise ValueError(f"a gathered {self.name} weight needs its quantization state; {self.name} bases are read "
                             "whole, in place")
        return self.dequantize(module)

    def sample(self, module: nn.Module, positions: torch.Tensor) -> torch.Tensor:
        return self.read(module).flatten()[positions.to(module.weight.device)].cpu()

    def sample_dtype(self, module: nn.Module) -> str:
        """The quantization's name (nf4, fp4, int8): the values compared are the dequantized ones."""
        return self.metadata(module, None)["quant_type"]

    def keeps_base(self, config: KaSAConfig) -> bool:
        return config.quant_mode == "low_rank_correction"

    def rewrite(self, target: Target, left: torch.Tensor, right: torch.Tensor, subtract: Subtract) -> None:
        """requantize: Q(D(Q(W)) − left·right) replaces the weight, computed where the placement holds it whole
        (a ZeRO-3 weight: gathered for this layer, rewritten on one rank, each shard rewritten once)."""
        with target.placement.whole(target) as writer:
            if writer:
                self.requantize(target.module, self.dequantize(target.module) - left.float() @ right.float())

    @torch.no_grad()
    def merged_linear(self, layer: KaSALinear) -> nn.Module:
        """A new nn.Linear holding the dequantized effective weight + ΔW, in :meth:`merged_dtype`."""
        base = layer.base_layer
        dtype = self.merged_dtype(base)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter((self.dequantize(base) + layer.effective_delta()).to(dtype), requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        return linear
