"""Processes: the launcher's rank and world size, joining the process group, barriers, leaving it together.

One module for every entry point (the recipe, the Megatron road, the tools): whatever started the ranks — torchrun,
the deepspeed launcher, srun, mpirun — :func:`init_processes` joins them into one torch.distributed world.

    launcher_rank / launcher_world_size   what the launcher set, readable before the process group exists
    init_processes                        join (gloo on CPU, NCCL on CUDA; through DeepSpeed when asked)
    barrier / shutdown_processes          wait for every rank; leave the group together
"""

from __future__ import annotations

import glob
import os
import sys
import warnings
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

#: the environment variables each launcher sets for (world size, rank)
LAUNCHER_VARIABLES = (("WORLD_SIZE", "RANK"), ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"),
                      ("PMI_SIZE", "PMI_RANK"))


def launcher_world_size() -> int:
    """Ranks the launcher started (torchrun/deepspeed's WORLD_SIZE, mpirun's OMPI_COMM_WORLD_SIZE, PMI_SIZE)."""
    return int(next((os.environ[w] for w, _ in LAUNCHER_VARIABLES if os.environ.get(w)), 1))


def launcher_rank() -> int:
    """This process's global rank as the launcher set it, before init (RANK; mpirun: OMPI_COMM_WORLD_RANK, PMI_RANK)."""
    return int(next((os.environ[r] for _, r in LAUNCHER_VARIABLES if os.environ.get(r)), 0))


def launched_distributed() -> bool:
    """Whether a launcher started this process as one rank of several (or of one, under torchrun)."""
    return any(w in os.environ for w, _ in LAUNCHER_VARIABLES)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def default_backend() -> str:
    """NCCL where this process has a CUDA device (and DeepSpeed is not told to use the CPU), gloo otherwise."""
    cuda = torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda"
    return "nccl" if cuda else "gloo"


def init_processes(*, deepspeed: bool = False, backend: Optional[str] = None,
                   timeout_minutes: float = 30) -> tuple[int, int]:
    """Join the launcher's ranks into the default process group; returns (rank, world size). Idempotent.

    ``deepspeed=True`` joins through ``deepspeed.init_distributed`` (its comm layer must be initialized for an
    engine; it discovers mpirun's ranks through mpi4py), then removes the names of DeepSpeed's CPU shared-memory
    segments once every rank has mapped them. Otherwise mpirun's ranks are read from its variables; a single process
    started without a launcher joins a group of one through an in-memory store (no rendezvous port: an inherited
    MASTER_PORT that another process holds cannot fail it)."""
    if is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend or default_backend()
    timeout = timedelta(minutes=timeout_minutes)
    if deepspeed:
        import deepspeed as ds

        # DeepSpeed calls two torch collectives torch 2.13 deprecated, warning on every call: keep the log readable
        warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).* is deprecated",
                                category=FutureWarning)
        ds.init_distributed(dist_backend=backend, auto_mpi_discovery=True, timeout=timeout)
        dist.barrier()  # every rank has now mapped every rank's shared-memory segment
        unlink_shm_name(dist.get_rank())
        return dist.get_rank(), dist.get_world_size()
    if "WORLD_SIZE" not in os.environ and launcher_world_size() == 1:  # one process, no launcher: no port to take
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return 0, 1
    if "WORLD_SIZE" not in os.environ:  # mpirun / PMI: rendezvous through the variables torch reads
        os.environ.update(RANK=str(launcher_rank()), WORLD_SIZE=str(launcher_world_size()),
                          LOCAL_RANK=os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", os.environ.get("LOCAL_RANK", "0")),
                          MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
    dist.init_process_group(backend, timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def local_device() -> torch.device:
    """This rank's device: CUDA ``LOCAL_RANK`` when CUDA is present (and made current), else the CPU."""
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


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


def barrier(group=None) -> None:
    """Wait for every rank of ``group`` (default: the world); nothing to wait for in one process."""
    if is_initialized():
        dist.barrier(group=group)


def shutdown_processes() -> None:
    """Leave the process group together: a rank exiting with live communicator threads can abort at interpreter
    exit ("terminate called without an active exception") after a run that succeeded."""
    if not is_initialized():
        return
    dist.barrier()
    dist.destroy_process_group()


def exit_now(code: int) -> None:
    """Leave without running C++ static destructors once a multi-rank run is over (its files are written and
    renamed, its metrics closed, its process group destroyed): with a 4-bit base under ZeRO-3, a rank otherwise
    sometimes aborts in interpreter teardown ("terminate called without an active exception", seen in 1 of ~6
    otherwise successful runs), turning a finished run into a failed job. The recipe's command and the tests'
    multi-rank workers end so."""
    sys.stdout.flush()
    sys.stderr.flush()
    mpi = sys.modules.get("mpi4py.MPI")  # under mpirun: finalize MPI, as its atexit hook would, or mpirun fails the job
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    os._exit(code)
