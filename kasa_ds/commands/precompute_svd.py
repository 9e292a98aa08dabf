"""``kasa-precompute-svd`` (``tools/precompute_svd.py``): precompute the KaSA truncation of a HF checkpoint once; launch/train.py (kasa.svd_cache) and tools/merge.py
reuse it and skip the SVDs.

The safetensors files are read tensor by tensor (headers first, then only the weights a rank owns); the weights are
spread over the ranks by SVD cost (kasa_ds.comm.schedule.assign_owners) and every rank writes the factors of its own
weights; the index records a digest of each weight's stored bytes, so the cache is refused for another model of the
same layout. One process, torch.distributed or MPI:

    python tools/precompute_svd.py --model DIR --kasa-r 16 --targets q_proj,k_proj,v_proj,o_proj --out CACHE
    torchrun --nproc_per_node 8 tools/precompute_svd.py --model DIR --kasa-r 16 --targets ... --out CACHE
    mpirun -np 8 python tools/precompute_svd.py ...                           (rank discovery through mpi4py)
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ..cli import bad_input_fails
from ..comm.processes import init_processes, launched_distributed, shutdown_processes
from ..config import KaSAConfig
from ..io.files import check_output_dir
from ..io.svd_cache import INDEX, cache_targets, write_svd_cache


def main(argv: Optional[Sequence[str]] = None) -> Path:
    p = argparse.ArgumentParser(prog="kasa-precompute-svd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="HF checkpoint directory (safetensors)")
    p.add_argument("--kasa-r", dest="r", type=int, required=True, help="KaSA rank r (triplets dropped)")
    p.add_argument("--targets", required=True, help="comma-separated module-name suffixes")
    p.add_argument("--solver", default="auto")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    with bad_input_fails():
        check_output_dir(a.out, lambda d: (d / INDEX).is_file(), models=[a.model])
        config = KaSAConfig(r=a.r, target_modules=a.targets.split(","), svd_solver=a.solver)
        cache_targets(a.model, config)  # headers only: a bad directory, target or r fails before any process starts
    distributed = launched_distributed()
    if distributed:
        init_processes(backend="gloo")
    try:
        with bad_input_fails():
            return write_svd_cache(a.model, config, a.out)
    finally:
        if distributed:
            shutdown_processes()
