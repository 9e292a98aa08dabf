"""DeepSpeed ZeRO-3 flat shards: each rank holds ``param.ds_tensor``, a 1/world slice of the padded, flattened weight.

Truncation (:func:`kasa_ds.placements.scheduled.truncate_scheduled`): each weight's shards are gathered to its owner
only, the owner solves, the thin factors are broadcast, and every rank rewrites its own shard once,
W_shard ← W_shard − (left·right)_shard (and the full copy of a persistent parameter, which lives on every rank):
a weight is never re-partitioned and no rank ever holds the model whole.

Regularizer: adapter parameters are partitioned outside forward, and the three terms are separable (‖ΔΣ‖² needs ΔΣ
only, ‖ΔVᵀΔV − I‖ lora_A only, ‖ΔUᵀΔU − I‖ lora_B only), so each is computed inside the forward of the module owning
its parameter, where DeepSpeed's hooks have gathered it, with its gradient taken analytically there
(kasa_ds.core.penalty); ``kasa_regularization`` sums them. Each term is tied (× 0) into its module's output, so its
gradient arrives during that module's backward, while the parameter is gathered: the loss must therefore depend on
the model's output, as any training loss does (task loss + regularizer).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ..config import KaSAConfig
from ..core.experts import KaSAExperts, expert_layers, parameter_name, projection_view
from ..core.layer import KaSALinear, kasa_layers
from ..core.types import AdapterTensor, ExpertsTarget, LayerReport, Target
from ..formats.dense import DENSE
from ..comm.collectives import comm_device, rank, start_gather_to_owner, world_size
from ..comm.schedule import DEFAULT_MAX_GATHER_BYTES
from .base import Placement, kasa_linear
from .scheduled import truncate_experts_scheduled, truncate_scheduled


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


class Zero3Placement(Placement):
    name = "zero3"
    regularize_in_forward = True

    def describe(self, module: nn.Module, name: str):
        """A partitioned nn.Linear (a bitsandbytes Linear4bit is one: its packed weight is partitioned like any)."""
        if isinstance(module, nn.Linear) and is_partitioned(module.weight):
            return (module.out_features, module.in_features), None
        return None

    def truncate(self, targets: list[Target], config: KaSAConfig, *, show_progress: bool = True,
                 distributed: bool = True, max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES) -> list[LayerReport]:
        """Collective over the world (the group the weights are partitioned over)."""
        return truncate_scheduled(targets, config, max_gather_bytes=max_gather_bytes or DEFAULT_MAX_GATHER_BYTES,
                                  show_progress=show_progress)

    def truncate_experts(self, targets: list[ExpertsTarget], config: KaSAConfig, *, show_progress: bool = True,
                         distributed: bool = True, max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES
                         ) -> list[LayerReport]:
        """Owner-scheduled per (fused parameter, range of experts) over the world: each owner gathers only its
        experts' bytes of the flat shards (kasa_ds.placements.scheduled.ExpertRangeJob). Collective."""
        cap = max_gather_bytes or DEFAULT_MAX_GATHER_BYTES
        return truncate_experts_scheduled(targets, config, max_gather_bytes=cap,
                                          show_progress=show_progress)

    def start_read_experts(self, target: ExpertsTarget, parameter: str, first: int, stop: int, owner, group):
        """Experts ``first`` … ``stop − 1`` occupy one flat range of the partitioned parameter: each rank sends the
        part of it inside its shard (padded to the longest part: one gather of equal sizes), the owner keeps them."""
        param = getattr(target.module, parameter)
        per_expert = math.prod(param.ds_shape[1:])
        lo, hi = first * per_expert, stop * per_expert
        parts = [_overlap(param, r, lo, hi) for r in range(world_size(group))]
        longest = max(b - a for a, b in parts)
        a, b = parts[rank(group)]
        start = rank(group) * param.ds_tensor.numel()
        send = torch.zeros(longest, dtype=param.dtype, device=comm_device())
        send[: b - a] = param.ds_tensor.detach().flatten()[a - start: b - start].to(send.device)
        gathered = start_gather_to_owner(send, owner, group)

        def finish() -> Optional[torch.Tensor]:
            flat = gathered()
            if flat is None:
                return None
            pieces = [flat[r * longest: r * longest + (y - x)] for r, (x, y) in enumerate(parts)]
            return torch.cat(pieces).float().view(stop - first, *param.ds_shape[1:])

        return finish

    @torch.no_grad()
    def subtract_experts(self, target: ExpertsTarget, parameter: str, first: int, tails) -> None:
        """Each expert of the range overlapping this rank's shard: its ΔW in the parameter's layout (every
        selected projection in place), and the overlapping elements subtracted from the shard (and from a
        persistent full copy)."""
        param = getattr(target.module, parameter)
        shard = param.ds_tensor
        per_expert = math.prod(param.ds_shape[1:])
        start = rank() * shard.numel()
        count = next(iter(tails.values()))[0].shape[0]
        persistent = param.data.numel() == param.ds_numel
        for e in range(first, first + count):
            a, b = _overlap(param, rank(), e * per_expert, (e + 1) * per_expert)
            if b <= a and not persistent:
                continue
            delta = torch.zeros(param.ds_shape[1:], dtype=torch.float32, device=shard.device)
            for p, (left, right) in tails.items():
                projection_view(delta[None], target.layout, p)[0].add_(
                    left[e - first].to(delta.device) @ right[e - first].to(delta.device))
            if b > a:
                part = shard.data[a - start: b - start]
                part.sub_(delta.flatten()[a - e * per_expert: b - e * per_expert].to(part.dtype))
            if persistent:
                full = param.data.view(param.ds_shape)[e]
                full.sub_(delta.to(full.device, full.dtype))

    @torch.no_grad()
    def sample_experts(self, target: ExpertsTarget, projection: str, positions: torch.Tensor) -> torch.Tensor:
        """Each rank contributes the samples inside its flat shard, summed over the world (nothing gathered): the
        flat index of a projection's element in its fused parameter comes from the strides of the same view of a
        meta tensor. Collective."""
        param = getattr(target.module, parameter_name(target.layout, projection))
        view = projection_view(torch.empty(param.ds_shape, device="meta"), target.layout, projection)
        _, m, n = view.shape
        e, within = positions // (m * n), positions % (m * n)
        stride = view.stride()
        flat = view.storage_offset() + e * stride[0] + (within // n) * stride[1] + (within % n) * stride[2]
        return _sample_flat(param, flat, None)

    def read_on_owner(self, target: Target, owner: int, group) -> Optional[torch.Tensor]:
        """The whole weight as float32 on ``owner``, gathered from the flat shards; None elsewhere. Collective."""
        return self.start_read_on_owner(target, owner, group)()

    def start_read_on_owner(self, target: Target, owner: int, group) -> Callable[[], Optional[torch.Tensor]]:
        """The gather of the flat shards to ``owner`` started (one collective, not waited for)."""
        weight = target.module.weight
        gathered = start_gather_to_owner(weight.ds_tensor.detach().to(comm_device()), owner, group)

        def finish() -> Optional[torch.Tensor]:
            flat = gathered()
            return None if flat is None else target.format.read(target.module,
                                                                flat[: weight.ds_numel].view(weight.ds_shape))

        return finish

    def holding_device(self, target: Target) -> torch.device:
        return target.module.weight.ds_tensor.device

    @torch.no_grad()
    def sample_weight(self, target: Target, positions: torch.Tensor, group=None) -> torch.Tensor:
        """A dense weight: each rank contributes the samples inside its flat shard, summed over the world (no weight
        gathered). A quantized one (packed bytes) is read whole on rank 0 (the default). Collective."""
        if target.format is not DENSE:
            return super().sample_weight(target, positions, group)
        return _sample_flat(target.module.weight, positions, group)

    def full_shape(self, param: torch.Tensor) -> tuple[int, ...]:
        return tuple(param.ds_shape)

    def holds_tensor(self, param: torch.Tensor) -> bool:
        """A ZeRO-3 partition, whoever adapted it: a model adapted whole and then handed to ZeRO-3 is gathered so."""
        return is_partitioned(param)

    @torch.no_grad()
    def subtract(self, target: Target, left: torch.Tensor, right: torch.Tensor) -> None:
        rewrite_shard(target.module.weight, left, right, rank())

    @contextmanager
    def whole(self, target: Target) -> Iterator[bool]:
        """The weight gathered on every rank for the block (one layer); rank 0 writes, and on leaving DeepSpeed
        re-partitions rank 0's version: each rank's shard is rewritten once. Collective."""
        import deepspeed

        with deepspeed.zero.GatheredParameters([target.module.weight], modifier_rank=0):
            yield rank() == 0

    def wrap(self, target: Target, config: KaSAConfig) -> KaSALinear:
        layer = kasa_linear(target, config)
        layer.set_regularize_in_forward(True)
        return layer

    def wrap_experts(self, target: ExpertsTarget, config: KaSAConfig) -> KaSAExperts:
        layer = super().wrap_experts(target, config)
        gather_experts_in_forward(layer)
        return layer

    def gather_adapter(self, items: list[AdapterTensor],
                       max_bytes: int = DEFAULT_MAX_GATHER_BYTES) -> dict[str, torch.Tensor]:
        """Full-shape tensors on rank 0 ({} elsewhere), gathered in groups of at most ``max_bytes``. Collective."""
        import deepspeed

        state: dict[str, torch.Tensor] = {}
        group: list[AdapterTensor] = []
        size = 0
        for i, item in enumerate(items):
            group.append(item)
            size += _nbytes(item.param)
            last = i == len(items) - 1
            if last or size + _nbytes(items[i + 1].param) > max_bytes:
                with deepspeed.zero.GatheredParameters([g.param for g in group], modifier_rank=None):
                    if rank() == 0:
                        state.update({g.key: g.param.detach().to("cpu").clone() for g in group})
                group, size = [], 0
        return state


def _overlap(param: nn.Parameter, shard_index: int, lo: int, hi: int) -> tuple[int, int]:
    """The part [a, b) of the flat range [lo, hi) of a partitioned ``param`` inside shard ``shard_index`` (a = b:
    none)."""
    per_rank = param.ds_tensor.numel()
    a = max(lo, shard_index * per_rank)
    b = min(hi, (shard_index + 1) * per_rank, param.ds_numel)
    return a, max(a, b)


def _sample_flat(param: nn.Parameter, positions: torch.Tensor, group) -> torch.Tensor:
    """The float32 values of a partitioned ``param`` at flat ``positions``, on every rank: each rank fills in those
    inside its shard and the world sums them. Collective."""
    shard = param.ds_tensor
    start = rank(group) * shard.numel()
    inside = (positions >= start) & (positions < start + shard.numel()) & (positions < param.ds_numel)
    values = torch.zeros(positions.shape, dtype=torch.float32, device=comm_device())
    values[inside.to(values.device)] = shard.detach().flatten()[(positions[inside] - start).to(shard.device)] \
        .float().to(values.device)
    torch.distributed.all_reduce(values, group=group)
    return values.cpu()


def _nbytes(p: torch.Tensor) -> int:
    return (p.ds_numel if is_partitioned(p) else p.numel()) * p.element_size()


def rewrite_shard(weight: nn.Parameter, left: torch.Tensor, right: torch.Tensor, shard_index: int) -> None:
    """W ← W − left·right on what this rank holds: its ZeRO-3 shard (and a persistent full copy).

    ``shard_index``: this process's index in the group the weight is partitioned over (its shard's position)."""
    with torch.no_grad():
        shard = weight.ds_tensor
        per_rank = shard.numel()
        start = shard_index * per_rank
        stop = min(start + per_rank, weight.ds_numel)
        if stop > start:
            n = weight.ds_shape[1]
            row0, row1 = start // n, (stop - 1) // n + 1  # rows this shard touches
            rows = (left[row0:row1] @ right).flatten()[start - row0 * n: stop - row0 * n]
            view = shard.data[: stop - start]
            view.sub_(rows.to(view.device, view.dtype))
        if weight.data.numel() == weight.ds_numel:  # persistent (or currently gathered) full copy
            weight.data.sub_((left @ right).to(weight.data.device, weight.dtype).view_as(weight.data))


def gather_experts_in_forward(layer: KaSAExperts) -> None:
    """KaSAExperts reads its base's fused parameters and its factors in its own forward, not through their modules'
    forwards: they are registered with DeepSpeed as the layer's external parameters, so ZeRO-3 gathers them for
    its forward and backward; the regularizer terms are computed there."""
    import deepspeed

    layer.set_regularize_in_forward(True)
    for param in [*layer.base_layer.parameters(), *(p for _, p in layer.adapter_parameters())]:
        deepspeed.zero.register_external_parameter(layer, param)


def prepare_for_zero3(model: nn.Module) -> None:
    """Before ``deepspeed.initialize`` of a model adapted while whole: each adapter parameter computes its regularizer
    term in its own module's forward, where ZeRO-3 has gathered it (and exactly it)."""
    for _, layer in kasa_layers(model):
        layer.set_regularize_in_forward(True)
        layer.placement = ZERO3
    for _, layer in expert_layers(model):
        gather_experts_in_forward(layer)
        layer.placement = ZERO3


ZERO3 = Zero3Placement()
