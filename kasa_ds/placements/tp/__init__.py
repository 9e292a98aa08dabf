"""Tensor-parallel placement: megatron-core and DeepSpeed AutoTP linears, one shard math for both.

Recognizers (:mod:`.megatron`, :mod:`.autotp`) turn a layer into a :class:`~.spec.ShardSpec`; truncation reduces
Grams over the TP group (:mod:`.truncate`); :class:`~.layer.KaSAParallelLinear` shards the adapter like the base.
Neither library is imported unless the model already uses it.
"""

from __future__ import annotations

import math
import sys
from typing import Optional

import torch
from torch import nn

from ...config import KaSAConfig
from ...core.types import AdapterTensor, LayerReport, Target
from ...comm.collectives import all_gather_uneven, gather_to_owner
from ..base import Placement
from .autotp import autotp_spec
from .layer import KaSAParallelLinear
from .megatron import megatron_spec
from .spec import ShardSpec, full_indices, join_factor, local_rows, sharded_factor, split_factor, subtract_local
from .truncate import truncate_tensor_parallel


def shard_spec(module: nn.Module, name: str = "module") -> Optional[ShardSpec]:
    """The module's TP sharding, or None for a module that is not a supported TP linear (libraries already loaded
    only: a model that uses megatron or AutoTP has imported them)."""
    if "megatron.core" in sys.modules:
        spec = megatron_spec(module, name)
        if spec is not None:
            return spec
    if "deepspeed" in sys.modules:
        return autotp_spec(module, name)
    return None


class TPPlacement(Placement):
    name = "tp"

    def describe(self, module: nn.Module, name: str):
        spec = shard_spec(module, name)
        return (spec.full_shape, spec) if spec is not None else None

    def truncate(self, targets: list[Target], config: KaSAConfig, *, show_progress: bool = True,
                 distributed: bool = True, max_gather_bytes: int = 0) -> list[LayerReport]:
        return truncate_tensor_parallel(targets, config, show_progress=show_progress)

    @torch.no_grad()
    def read_on_owner(self, target: Target, owner: int, group=None) -> Optional[torch.Tensor]:
        """The whole weight in the TP=1 layout (m×n, float32) on ``owner``, a rank of the weight's TP group (the
        layer's own: ``group`` must be it or None), None elsewhere. Collective over the TP group: each rank sends its
        rows (or columns), the owner puts them where they sit in the unsplit weight (fused [gate; up] blocks too)."""
        spec = target.spec
        rows = local_rows(target.format.read(target.module), spec)
        gathered = rows if spec.tp_size == 1 else gather_to_owner(rows, owner, spec.group, sizes=spec.sizes)
        if gathered is None:
            return None
        whole = torch.empty_like(gathered)
        whole[torch.cat([full_indices(spec, r) for r in range(spec.tp_size)]).to(whole.device)] = gathered
        return whole if spec.dim == 0 else whole.T

    @torch.no_grad()
    def sample_weight(self, target: Target, positions: torch.Tensor, group=None) -> torch.Tensor:
        """Each TP rank contributes the samples in its rows (columns) of the unsplit weight, summed over the TP
        group (no weight gathered). Collective over the layer's TP group."""
        spec, weight = target.spec, target.module.weight
        m, n = spec.full_shape
        rows, cols = positions // n, positions % n
        split = rows if spec.dim == 0 else cols
        mine = full_indices(spec, spec.tp_rank)
        local = torch.full((spec.full_shape[spec.dim],), -1, dtype=torch.long)
        local[mine] = torch.arange(len(mine))
        where = local[split]
        values = torch.zeros(positions.shape, dtype=torch.float32, device=weight.device)
        held = where >= 0
        if held.any():
            r, c = (where[held], cols[held]) if spec.dim == 0 else (rows[held], where[held])
            if spec.rows is not None:  # a projection of a fused linear: its rows within the fused shard
                r = spec.rows.cpu()[r]
            values[held.to(weight.device)] = weight.detach()[r.to(weight.device), c.to(weight.device)].float()
        if spec.tp_size > 1:
            torch.distributed.all_reduce(values, group=spec.group)
        return values.cpu()

    @torch.no_grad()
    def subtract(self, target: Target, left: torch.Tensor, right: torch.Tensor) -> None:
        """This rank's rows (dim 0) or columns (dim 1) of W − left·right, in the TP=1 layout of left/right."""
        spec = target.spec
        index = full_indices(spec, spec.tp_rank).to(left.device)
        left, right = (left[index], right) if spec.dim == 0 else (left, right[:, index])
        delta = left.float() @ right.float()
        subtract_local(target.module.weight, spec, delta if spec.dim == 0 else delta.T)

    def wrap(self, target: Target, config: KaSAConfig) -> KaSAParallelLinear:
        return KaSAParallelLinear(target.module, target.spec, config.r, config.alpha, config.dropout, config.beta,
                                  config.gamma, adapter_dtype=getattr(torch, config.adapter_dtype))

    def whole_numels(self, model: nn.Module) -> dict[int, int]:
        """Each KaSA layer's sharded factor (r × the unsplit dimension), AutoTP's split weights (the unsplit shape it
        records) and their biases (the output size), and megatron-core's ``tensor_model_parallel`` tensors (× the TP
        size). No collective."""
        whole: dict[int, int] = {}
        megatron_tp = 1
        if "megatron.core" in sys.modules:
            from megatron.core import parallel_state

            if parallel_state.model_parallel_is_initialized():
                megatron_tp = parallel_state.get_tensor_model_parallel_world_size()
        for p in model.parameters():
            if getattr(p, "tensor_model_parallel", False):
                whole[id(p)] = p.numel() * megatron_tp
        for module in model.modules():
            orig = getattr(module, "_orig_weight_shape", None)  # DeepSpeed AutoTP's TensorParallel_Layer
            if orig is not None and isinstance(getattr(module, "weight", None), torch.Tensor):
                whole[id(module.weight)] = math.prod(orig)
                if getattr(module, "bias", None) is not None:
                    whole[id(module.bias)] = int(orig[0])
            if isinstance(module, KaSAParallelLinear):
                spec = module.spec
                factor = module.lora_B.weight if sharded_factor(spec) == "lora_B.weight" else module.lora_A.weight
                whole[id(factor)] = module.r * spec.full_shape[spec.dim]
        return whole

    def gather_adapter(self, items: list[AdapterTensor]) -> dict[str, torch.Tensor]:
        """{key: full tensor} on every rank: each layer's sharded factor is all-gathered over its TP group (r × its
        split dimension per layer, never a base weight), replicated tensors are taken as held. Collective over every
        TP group."""
        state = {}
        for item in items:
            spec = item.layer.spec
            if spec.tp_size > 1 and item.name == sharded_factor(spec):
                parts = all_gather_uneven(item.param.detach(), spec.sizes, spec.dim, spec.group)
                state[item.key] = join_factor(parts, spec).cpu()
            else:
                state[item.key] = item.param.detach().to("cpu").contiguous()
        return state

    def load_adapter_tensor(self, item: AdapterTensor, value: torch.Tensor) -> torch.Tensor:
        """A full-shape sharded factor cut to this rank's shard (an adapter of any TP size loads at any other)."""
        spec = item.layer.spec
        if item.name == sharded_factor(spec) and tuple(item.param.shape) != tuple(value.shape):
            return split_factor(value, spec, spec.tp_rank)
        return value


def tp_layers(model: nn.Module):
    for name, module in model.named_modules():
        if isinstance(module, KaSAParallelLinear):
            yield name, module


TP = TPPlacement()

__all__ = ["TP", "TPPlacement", "KaSAParallelLinear", "ShardSpec", "shard_spec", "tp_layers", "local_rows"]
