"""The recipe's processes: joined through DeepSpeed (any launcher, mpirun too; kasa_ds.comm.processes), the device."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..comm.processes import init_processes, launcher_world_size, local_device
from .config import TrainConfig


@dataclass
class ProcessEnv:
    rank: int
    world: int
    device: torch.device


def setup_distributed(cfg: TrainConfig) -> ProcessEnv:
    """Initialize torch.distributed (through DeepSpeed, except for the megatron backend, which always needs it) when
    launched with several ranks, DeepSpeed or megatron; pick CUDA when present."""
    rank, world = 0, 1
    megatron = cfg.backend == "megatron"
    if cfg.ds_config or launcher_world_size() > 1 or megatron:
        rank, world = init_processes(deepspeed=not megatron, timeout_minutes=cfg.distributed_timeout_minutes)
    return ProcessEnv(rank, world, local_device())


def mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return (t / world).item()
