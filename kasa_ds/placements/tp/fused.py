"""A megatron-core linear seen as the Hugging Face projections it computes, so KaSA adapts each by its own tail.

megatron-core fuses projections that HF models keep apart. On TP rank i (t ranks, G query groups, h heads of width d,
hpg = h / G heads per group, F the MLP width):

    linear_qkv   column-parallel: for each of its G/t groups g, the rows [q heads of g (hpg·d); k_g (d); v_g (d)]
    linear_fc1   column-parallel, gated: [gate_i (F/t); up_i (F/t)]
    linear_proj  row-parallel: o_proj;  linear_fc2  row-parallel: down_proj

:class:`Projections` wraps such a linear. Each projection is a child :class:`ProjectionView` named as in the HF
model (``q_proj``, …) holding which rows of the fused local shard are its own (in its own row order): the registry
classifies a view like any TP linear (a :class:`~.spec.ShardSpec` whose ``rows`` pick the view out of the fused
weight), so ``target_modules`` take HF names, each projection is truncated by its own r smallest triplets (the same
W_world as the HF model's q_proj, …) and gets its own ΔU, ΔΣ, ΔVᵀ. The wrapper runs the fused base once and adds each
adapted projection's update into its rows. Which rows are whose is megatron's layout, read from
kasa_ds.io.megatron_checkpoint (qkv_rows, glu_rows) by the model builder (kasa_ds.training.megatron_model).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ...core.layer import KaSALinear


class ProjectionView(nn.Module):
    """One projection of a fused linear: ``rows`` of its local shard (None: all of it), ``full_rows`` its unsplit
    output width. Holds no tensor of its own: ``weight`` is the fused shard, the spec's ``rows`` pick the view."""

    def __init__(self, fused: nn.Module, rows: Optional[torch.Tensor], full_rows: int) -> None:
        super().__init__()
        self.__dict__["fused"] = fused  # not a child: the wrapper owns the fused linear, state dicts stay megatron's
        self.register_buffer("rows", rows, persistent=False)  # moves with the model; not in state dicts
        self.full_rows = full_rows

    @property
    def weight(self) -> nn.Parameter:
        return self.fused.weight

    def forward(self, x: torch.Tensor):
        raise RuntimeError("a projection view is computed by its Projections wrapper (one fused matmul)")

    def extra_repr(self) -> str:
        rows = "all" if self.rows is None else len(self.rows)
        return f"rows={rows} of {type(self.fused).__name__}, full_rows={self.full_rows}"


class Projections(nn.Module):
    """A megatron TP linear (``base_layer``, returning (output, bias)) with its HF projections as children.

    forward: x → (base output + each adapted projection's update in its rows, bias), the base computed once.
    """

    def __init__(self, base_layer: nn.Module, views: dict[str, ProjectionView]) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.names = tuple(views)
        for name, view in views.items():
            self.add_module(name, view)

    def forward(self, x: torch.Tensor, *args, **kwargs):
        out, bias = self.base_layer(x, *args, **kwargs)
        for name in self.names:
            layer = getattr(self, name)
            if not isinstance(layer, KaSALinear) or layer.merged:
                continue
            update = layer.update(x).to(out.dtype)
            rows = layer.base_layer.rows
            out = out + update if rows is None else out.index_add(-1, rows.to(out.device), update)
        return out, bias
