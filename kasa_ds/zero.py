"""KaSA under data parallelism and DeepSpeed ZeRO-3: distributed truncation, regularizer, gathered adapter state.

Distributed truncation (:func:`truncate_distributed`), for a model whose target weights are either ZeRO-3
partitioned (each rank holds ``param.ds_tensor``, a flat 1/world slice of the padded, flattened weight) or
replicated (ZeRO ≤ 2, DDP: every rank holds the whole weight). Every rank runs the same steps in the same order:

    plan     every rank computes the same schedule: weights sorted by SVD cost, each given an owner rank (least
             loaded first), cut into rounds in which no rank gathers more than ``max_gather_bytes``;
    gather   per round, each weight's shards are gathered to its owner only (``dist.gather``); a replicated weight
             is read locally instead. Non-owners hold nothing extra;
    solve    owners run the tail solver on their weights concurrently (the SVD work is spread, not repeated);
    share    each owner broadcasts the thin factors (left m×r, right r×n), never the weight;
    rewrite  each rank rewrites its own shard, W_shard ← W_shard − (left·right)_shard, once per weight (and the full
             copy of a ZeRO-3 persistent parameter, which lives on every rank).

Results equal the single-process truncation of the same weights with the same solver, whatever the world size:
the owner computes exactly what one process would.

Regularizer under ZeRO-3: adapter parameters are partitioned outside forward, and its three terms are separable
(‖ΔΣ‖² needs ΔΣ only, ‖ΔVᵀΔV − I‖ needs lora_A only, ‖ΔUᵀΔU − I‖ lora_B only), so :func:`prepare_for_zero3` has each
computed inside the forward of the module owning its parameter, where DeepSpeed's own hooks have gathered it, with
its gradient taken analytically there (kasa_ds.layer); ``kasa_regularization`` sums them. Each term is tied (× 0)
into its module's output, so its gradient arrives during that module's backward, while the parameter is gathered:
the loss must therefore depend on the model's output, as any training loss does (task loss + regularizer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import KaSAConfig
from .inject import LayerReport, Target
from .layer import kasa_layers
from .truncation import tail_factors
from .utils import progress

DEFAULT_MAX_GATHER_BYTES = 2 << 30


@dataclass
class WorkItem:
    """One weight to truncate: its name, shape (m, n) and size in bytes as stored."""

    name: str
    shape: tuple[int, int]
    nbytes: int


@dataclass
class Assignment:
    index: int  # into the list given to plan()
    owner: int
    round: int


def is_partitioned(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id") and hasattr(param, "ds_tensor")


def svd_cost(shape: tuple[int, int]) -> float:
    """Relative cost of one tail solve: the Gram (m·n·k) plus its eigh (~k³), k = min(m, n)."""
    m, n = shape
    k = min(m, n)
    return m * n * k + 4.0 * k ** 3


def plan(items: list[WorkItem], world: int, max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES) -> list[Assignment]:
    """Owner and round of every item, in the items' order; deterministic, identical on all ranks.

    Longest-processing-time-first: the costliest weight goes to the least loaded rank. A new round starts when a
    weight would push its owner's gathered bytes in the current round past ``max_gather_bytes`` (a weight larger than
    the cap gets a round of its own on its owner).
    """
    order = sorted(range(len(items)), key=lambda i: (-svd_cost(items[i].shape), i))
    load = [0.0] * world
    round_bytes = [0] * world
    current = 0
    out: list[Optional[Assignment]] = [None] * len(items)
    for i in order:
        item = items[i]
        owner = min(range(world), key=lambda r: (load[r], r))
        if round_bytes[owner] and round_bytes[owner] + item.nbytes > max_gather_bytes:
            current += 1
            round_bytes = [0] * world
        round_bytes[owner] += item.nbytes
        load[owner] += svd_cost(item.shape)
        out[i] = Assignment(i, owner, current)
    return [a for a in out if a is not None]


def work_items(targets: list[Target]) -> list[WorkItem]:
    return [WorkItem(t.name, t.shape, t.module.weight.element_size() * t.shape[0] * t.shape[1]) for t in targets]


def truncate_distributed(targets: list[Target], config: KaSAConfig, *, group=None,
                         max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES, show_progress: bool = True) -> list[LayerReport]:
    """Step 2 of ``apply_kasa`` over all ranks of ``group`` (default: the world). Collective: call on every rank."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    assignments = plan(work_items(targets), world, max_gather_bytes)
    rounds = sorted({a.round for a in assignments})
    reports: dict[str, LayerReport] = {}
    bar = progress(total=len(targets), desc=f"KaSA truncation ({world} ranks)", unit="layer",
                   disable=not (show_progress and rank == 0))
    for rnd in rounds:
        batch = [(targets[a.index], a.owner) for a in assignments if a.round == rnd]  # same order on every rank
        mine: dict[str, torch.Tensor] = {}
        for target, owner in batch:
            full = _gather_to_owner(target.module.weight, owner, rank, world, group)
            if owner == rank:
                mine[target.name] = full
        solved = {}
        for name, weight in mine.items():  # owners solve concurrently, each its own weights
            tic = time.perf_counter()
            tail = tail_factors(weight, config.r, config.svd_solver)
            solved[name] = (tail.left.float(), tail.right.float(), tail.tail_energy, time.perf_counter() - tic)
        for target, owner in batch:
            m, n = target.shape
            weight = target.module.weight
            device = _comm_device()
            if owner == rank:
                left, right, energy, seconds = solved.pop(target.name)
                meta = torch.tensor([energy, seconds], dtype=torch.float64, device=device)
                left, right = left.to(device).contiguous(), right.to(device).contiguous()
            else:
                meta = torch.empty(2, dtype=torch.float64, device=device)
                left = torch.empty(m, config.r, dtype=torch.float32, device=device)
                right = torch.empty(config.r, n, dtype=torch.float32, device=device)
            src = dist.get_global_rank(group, owner) if group is not None else owner
            for t in (left, right, meta):
                dist.broadcast(t, src=src, group=group)
            rewrite_local(weight, left, right, rank)
            reports[target.name] = LayerReport(target.name, target.shape, meta[0].item(), meta[1].item())
            bar.update(1)
    bar.close()
    return [reports[t.name] for t in targets]


def _gather_to_owner(weight: nn.Parameter, owner: int, rank: int, world: int, group) -> Optional[torch.Tensor]:
    """The full weight (m×n) on ``owner``, None elsewhere. Collective for a partitioned weight."""
    if not is_partitioned(weight):
        return weight.detach() if rank == owner else None
    device = _comm_device()
    shard = weight.ds_tensor.detach().to(device)
    gathered = [torch.empty_like(shard) for _ in range(world)] if rank == owner else None
    dst = dist.get_global_rank(group, owner) if group is not None else owner
    dist.gather(shard, gathered, dst=dst, group=group)
    if rank != owner:
        return None
    return torch.cat(gathered)[: weight.ds_numel].view(weight.ds_shape)


def rewrite_local(weight: nn.Parameter, left: torch.Tensor, right: torch.Tensor, rank: int) -> None:
    """W ← W − left·right on what this rank holds: its ZeRO-3 shard (and a persistent full copy), or the weight.

    ``rank`` is this process's index in the group the weight is partitioned over (its shard's position)."""
    with torch.no_grad():
        if not is_partitioned(weight):
            weight.sub_((left @ right).to(weight.device, weight.dtype))
            return
        shard = weight.ds_tensor
        per_rank = shard.numel()
        start = rank * per_rank
        stop = min(start + per_rank, weight.ds_numel)
        if stop > start:
            n = weight.ds_shape[1]
            row0, row1 = start // n, (stop - 1) // n + 1  # rows this shard touches
            rows = (left[row0:row1] @ right).flatten()[start - row0 * n: stop - row0 * n]
            view = shard.data[: stop - start]
            view.sub_(rows.to(view.device, view.dtype))
        if weight.data.numel() == weight.ds_numel:  # persistent (or currently gathered) full copy
            weight.data.sub_((left @ right).to(weight.data.device, weight.dtype).view_as(weight.data))


def _comm_device() -> torch.device:
    """Where collectives on ``t`` must run: the accelerator for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- ZeRO-3 training ---------------------------------------------------------------------------------------------

def prepare_for_zero3(model: nn.Module) -> None:
    """Before ``deepspeed.initialize``: each adapter parameter computes its regularizer term in its own module's
    forward, where ZeRO-3 has gathered it (and exactly it)."""
    for _, layer in kasa_layers(model):
        layer.set_regularize_in_forward(True)


def gathered_adapter_state(model: nn.Module, max_bytes: int = DEFAULT_MAX_GATHER_BYTES) -> dict[str, torch.Tensor]:
    """PEFT-keyed adapter tensors with their full shapes on rank 0 ({} elsewhere). Collective: call on every rank.

    Parameters are gathered in groups of at most ``max_bytes``; nothing but adapters and modules_to_save is gathered.
    """
    import deepspeed

    from .adapter_io import PREFIX, adapter_param_items

    items = adapter_param_items(model)
    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, torch.Tensor] = {}
    group: list[tuple[str, nn.Parameter]] = []

    def flush():
        with deepspeed.zero.GatheredParameters([p for _, p in group], modifier_rank=None):
            if rank == 0:
                for key, p in group:
                    state[PREFIX + key] = p.detach().to("cpu").clone()
        group.clear()

    size = 0
    for key, p in items:
        nbytes = p.ds_numel * p.element_size() if is_partitioned(p) else p.numel() * p.element_size()
        if group and size + nbytes > max_bytes:
            flush()
            size = 0
        group.append((key, p))
        size += nbytes
    if group:
        flush()
    return state
