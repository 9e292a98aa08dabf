"""Which (format, placement) a module is, and the one table of combinations kasa_ds refuses, each with its fix.

Formats and placements are tried in order, first match wins (PEFT's dispatchers): a bitsandbytes Linear4bit is also
an nn.Linear, so 4-bit is asked first; a tensor-parallel layer is recognized before a ZeRO-3 partition, which is
recognized before a weight held whole. This is the only code that decides a placement: each adapted layer records
the one it got (kasa_ds.inject), and io/ asks :func:`placement_of` for an adapter tensor's. Adding a base kind is
one module under formats/ or placements/ plus one line here (README, "Adding a base kind").
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

from .config import KaSAConfig
from .core.experts import experts_layout, targeted_projections
from .core.types import AdapterTensor, ExpertsTarget, Target
from .formats.base import Format
from .formats.bnb4 import BNB4
from .formats.bnb8 import BNB8
from .formats.dense import DENSE
from .placements.base import Placement
from .placements.local import LOCAL
from .placements.tp import TP
from .placements.zero3 import ZERO3

FORMATS: tuple[Format, ...] = (BNB4, BNB8, DENSE)
PLACEMENTS: tuple[Placement, ...] = (TP, ZERO3, LOCAL)

#: (format, placement or run context) → why not, and what to do instead. "deepspeed" is a DeepSpeed engine of any
#: ZeRO stage (the recipe's context: its optimizer, precision and checkpointing), not a weight placement.
REFUSED: dict[tuple[str, str], str] = {
    ("bnb4", "tp"): "4-bit bases (QKaSA) are not tensor-parallel: drop tensor_parallel or model.quantize",
    ("bnb4", "deepspeed"): "4-bit bases (QKaSA) under DeepSpeed need ZeRO-3, which partitions the packed 4-bit "
                           "weights (--ds_config ds_configs/zero3.json, or ds_configs/qkasa_70b_zero3.json); or "
                           "train in one process (drop --ds_config)",
    ("bnb8", "zero3"): "8-bit bases under ZeRO-3 are not supported: train in one process, or use a 16-bit base",
    ("bnb8", "tp"): "8-bit bases are not tensor-parallel: use a 16-bit base for tensor parallelism",
}

#: module kinds that look like linears but are refused, with the fix
UNSUPPORTED_KINDS = {
    "Conv1D": "GPT-2 style Conv1D (transposed weight) is not supported, as in PEFT's KaSA; target nn.Linear layers or "
              "convert the model to nn.Linear first",
}


def refusal(format_name: str, context: str) -> Optional[str]:
    """The message for a refused combination, or None where it is supported."""
    return REFUSED.get((format_name, context))


def classify(module: nn.Module, name: str) -> Optional[Target]:
    """The Target for ``module`` (format, placement, whole shape), or None if it is no base kasa_ds adapts (a
    container, say). Raises ValueError naming the fix for a known kind or combination that is refused."""
    kind = type(module).__name__
    if kind in UNSUPPORTED_KINDS:
        raise ValueError(f"{name}: {UNSUPPORTED_KINDS[kind]}")
    for placement in PLACEMENTS:
        described = placement.describe(module, name)
        if described is None:
            continue
        shape, spec = described
        fmt = next((f for f in FORMATS if f.matches(module)), None)
        if fmt is None:
            raise ValueError(f"{name}: {kind} holds its weight in a format kasa_ds does not read "
                             f"({type(getattr(module, 'weight', None)).__name__}); known formats: "
                             f"{', '.join(f.name for f in FORMATS)}")
        why = refusal(fmt.name, placement.name)
        if why is not None:
            raise ValueError(f"{name}: {why}")
        return Target(name, module, fmt, placement, tuple(shape), spec)
    return None


def experts_layout_of(module: nn.Module):
    """The fused-experts layout of ``module`` (kasa_ds.core.experts.ExpertsLayout) read at its whole shapes, or None."""
    return experts_layout(module, full_shape)


def classify_experts(module: nn.Module, name: str, config: KaSAConfig) -> Optional[ExpertsTarget]:
    """The ExpertsTarget of a fused experts module with projections ``config`` selects; None for any other module or
    where none is selected. Raises ValueError naming the fix where its placement is refused."""
    layout = experts_layout_of(module)
    if layout is None:
        return None
    projections = targeted_projections(name, layout, config.is_target)
    if not projections:
        return None
    placement = next(p for p in PLACEMENTS if p is LOCAL or p.holds_tensor(module.down_proj))
    why = refusal("experts", placement.name)
    if why is not None:
        raise ValueError(f"{name}: {why}")
    return ExpertsTarget(name, module, layout, projections, placement)


def placement_of(item: AdapterTensor) -> Placement:
    """The placement that gathers and loads one adapter tensor: the one its KaSA layer recorded at injection, unless
    a placement earlier in the order now holds the tensor by its storage (a model adapted whole and then handed to
    ZeRO-3); a modules_to_save parameter (no layer) gets the first placement that holds it."""
    recorded = getattr(item.layer, "placement", None)
    return next(p for p in PLACEMENTS if (recorded is not None and p.name == recorded.name)
                or p.holds_tensor(item.param))


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The whole shape of any parameter, asked of the placement that holds it (a ZeRO-3 partition is empty here)."""
    return placement_of(AdapterTensor("", param)).full_shape(param)


def whole_numel(model: nn.Module) -> Callable[[torch.Tensor], int]:
    """``numel(param)``: the element count of ``param`` unsplit, as one unsplit model holds it (a TP shard counts its
    whole tensor, a ZeRO-3 partition the shape it was cut from); the same on every rank, no collective."""
    whole: dict[int, int] = {}
    for placement in PLACEMENTS:
        whole.update(placement.whole_numels(model))
    return lambda p: whole.get(id(p)) or math.prod(full_shape(p))


def by_placement(items: list[AdapterTensor]) -> list[tuple[Placement, list[AdapterTensor]]]:
    """``items`` grouped by :func:`placement_of`, in the registry's order (the same on every rank: collectives
    stay aligned)."""
    groups: dict[str, list[AdapterTensor]] = {}
    for item in items:
        groups.setdefault(placement_of(item).name, []).append(item)
    return [(p, groups[p.name]) for p in PLACEMENTS if p.name in groups]


def format_of(module: nn.Module) -> Format:
    """The format of a base layer (for merging and metadata)."""
    return next(f for f in FORMATS if f.matches(module))
