"""Precompute the KaSA truncation of a HF checkpoint once; launch/train.py (kasa.svd_cache) and tools/merge.py
reuse it and skip the SVDs.

The safetensors files are read tensor by tensor (headers first, then only the weights a rank owns); the weights are
spread over the ranks by SVD cost (kasa_ds.dist.schedule.assign_owners) and every rank writes the factors of its own
weights; the index records a digest of each weight's stored bytes, so the cache is refused for another model of the
same layout. One process, torch.distributed or MPI:

    python tools/precompute_svd.py --model DIR --kasa-r 16 --targets q_proj,k_proj,v_proj,o_proj --out CACHE
    torchrun --nproc_per_node 8 tools/precompute_svd.py --model DIR --kasa-r 16 --targets ... --out CACHE
    mpirun -np 8 python tools/precompute_svd.py ...                           (rank discovery through mpi4py)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from kasa_ds.cli import bad_input_fails, fail  # noqa: E402
from kasa_ds.config import KaSAConfig  # noqa: E402
from kasa_ds.io.files import check_output_dir  # noqa: E402
from kasa_ds.io.hf_checkpoint import list_tensors, read_tensor, weight_digest  # noqa: E402
from kasa_ds.io.svd_cache import INDEX, cache_fingerprint  # noqa: E402
from kasa_ds.core.truncation import check_rank, tail_factors  # noqa: E402
from kasa_ds.progress import progress  # noqa: E402
from kasa_ds.dist.schedule import WorkItem, assign_owners  # noqa: E402

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def init_processes() -> tuple[int, int]:
    if "WORLD_SIZE" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ:
        if "WORLD_SIZE" not in os.environ:  # mpirun: ranks from MPI
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
            os.environ.update(RANK=str(comm.Get_rank()), WORLD_SIZE=str(comm.Get_size()),
                              MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29511"))
        dist.init_process_group("gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (safetensors)")
    p.add_argument("--kasa-r", dest="r", type=int, required=True, help="KaSA rank r (triplets dropped)")
    p.add_argument("--targets", required=True, help="comma-separated module-name suffixes")
    p.add_argument("--solver", default="auto")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    with bad_input_fails():
        check_output_dir(a.out, lambda d: (d / INDEX).is_file(), models=[a.model])
    config = KaSAConfig(r=a.r, target_modules=a.targets.split(","), svd_solver=a.solver)
    tensors = list_tensors(a.model)  # headers only; errors out on a bad directory before any work
    names = [k.removesuffix(".weight") for k, info in tensors.items()
             if k.endswith(".weight") and len(info.shape) == 2 and config.is_target(k.removesuffix(".weight"))]
    if not names:
        fail(f"--targets {a.targets} matched no 2-D weight in {a.model}")
    for name in names:
        check_rank(a.r, tensors[name + ".weight"].shape, name)
    rank, world = init_processes()
    items = [WorkItem(n, tensors[n + ".weight"].shape,
                      DTYPE_BYTES.get(tensors[n + ".weight"].dtype, 4) * tensors[n + ".weight"].shape[0]
                      * tensors[n + ".weight"].shape[1]) for n in names]
    mine = [items[x.index].name for x in assign_owners(items, world) if x.owner == rank]
    out = Path(a.out)
    tmp = out.with_name(f".{out.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if world > 1:
        dist.barrier()
    factors, tic = {}, time.perf_counter()
    for name in progress(mine, desc=f"SVD ({world} ranks)", unit="weight", disable=rank != 0):
        tail = tail_factors(read_tensor(a.model, tensors[name + ".weight"], name + ".weight"), a.r, a.solver)
        factors[name + ".left"], factors[name + ".right"] = tail.left.float().contiguous(), tail.right.float()
    file = f"factors-rank{rank:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in factors.items()}, str(tmp / file))
    owners = [None] * world
    if world > 1:
        dist.all_gather_object(owners, {n: file for n in mine})
    else:
        owners = [{n: file for n in mine}]
    if rank == 0:
        entries = {n: f for part in owners for n, f in part.items()}
        digests = {n: weight_digest(a.model, tensors[n + ".weight"], n + ".weight") for n in entries}
        (tmp / INDEX).write_text(json.dumps({"fingerprint": cache_fingerprint(a.model, config), "entries": entries,
                                             "digests": digests, "targets": config.target_modules}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        print(f"SVD cache for {len(entries)} weights written to {out} ({time.perf_counter() - tic:.1f}s on rank 0)")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


if __name__ == "__main__":
    main()
