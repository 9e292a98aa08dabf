"""The recipe's processes: torch.distributed through DeepSpeed (any launcher, mpirun too), the device, a clean exit."""

from __future__ import annotations

import glob
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .config import TrainConfig


@dataclass
class ProcessEnv:
    rank: int
    world: int
    device: torch.device


def launcher_world_size() -> int:
    """Ranks the launcher started (torchrun/deepspeed's WORLD_SIZE, mpirun's OMPI_COMM_WORLD_SIZE), before init."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("OMPI_COMM_WORLD_SIZE") or 1)


def launcher_rank() -> int:
    """This process's global rank as the launcher set it, before init (torchrun/deepspeed/srun scripts: RANK;
    mpirun: OMPI_COMM_WORLD_RANK or PMI_RANK)."""
    return int(os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK") or 0)


def setup_distributed(cfg: TrainConfig) -> ProcessEnv:
    """Initialize torch.distributed when launched with several ranks or DeepSpeed; pick CUDA when present."""
    # DeepSpeed calls two torch collectives torch 2.13 deprecated, warning on every call: keep the log readable
    warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                            category=FutureWarning)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.ds_config or world > 1:
        import deepspeed

        cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
        # under mpirun (no RANK in the environment) DeepSpeed discovers ranks through mpi4py and sets the variables
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=True,
                                   timeout=timedelta(minutes=cfg.distributed_timeout_minutes))
        world = dist.get_world_size()
        dist.barrier()  # every rank has now mapped every rank's shared-memory segment
        unlink_shm_name(dist.get_rank())
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    rank = dist.get_rank() if world > 1 or cfg.ds_config else 0
    return ProcessEnv(rank, world, torch.device("cuda", local_rank) if cuda else torch.device("cpu"))


def unlink_shm_name(rank: int) -> None:
    """Remove the name of this rank's DeepSpeed CPU shared-memory allreduce segment (≈ 66 MiB in /dev/shm).

    DeepSpeed's shm.cpp creates one per rank in ``init_distributed`` and maps every peer's before returning, but
    never unlinks them: every run (every crashed or killed one too) left them in /dev/shm. Called once all ranks are
    past init (a barrier), the names go and the mappings stay valid; the memory is freed when the last rank exits,
    however it exits. Nothing to do on CUDA (NCCL)."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not (addr and port):
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def shutdown_distributed() -> None:
    """Leave the process group together: a rank exiting with live communicator threads can abort at interpreter
    exit ("terminate called without an active exception") after a run that succeeded."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    dist.destroy_process_group()


def mean_over_ranks(value: float, device: torch.device, world: int) -> float:
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    dist.all_reduce(t)
    return (t / world).item()


def barrier() -> None:
    """Wait for every rank of the default group (nothing to wait for in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
