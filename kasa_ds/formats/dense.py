"""Dense float bases: nn.Linear (any float dtype) and tensor-parallel linears holding float shards."""

from __future__ import annotations

from torch import nn

from .base import Format


class DenseFormat(Format):
    name = "dense"

    def matches(self, module: nn.Module) -> bool:
        """A float weight (the placement has already checked that the module is a linear it handles)."""
        weight = getattr(module, "weight", None)
        return isinstance(weight, nn.Parameter) and weight.is_floating_point()


DENSE = DenseFormat()
