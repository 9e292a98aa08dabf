#!/usr/bin/env python
"""Tensor-parallel KaSA truncation: the Gram reduce (kasa_ds) vs gathering the weight and an SVD on one rank.

    python tools/bench_tp_init.py                  # 2 ranks (re-launches itself with torchrun), gloo on CPU
    python tools/bench_tp_init.py --tp 4 --sizes 2048 --r 16
    python tools/bench_tp_init.py --smoke          # tiny shapes, for the test suite

For each weight (square d×d and rectangular 1:3.5, e.g. a Llama MLP's d×3.5d) and each split (column-parallel:
rows; row-parallel: columns):
    kasa_ds   kasa_ds.placements.tp.truncate.truncate_tensor_parallel: each rank reduces its float64 Gram share to the owner (or
              gathers, where the Gram would be the larger message), the owner solves, the basis is broadcast,
              every rank rewrites its own shard;
    gather    what a TP-unaware implementation does: gather the shards to rank 0, float32 SVD there (PEFT's solver),
              scatter W_world's shards back.
Bytes are counted from the messages each path sends (every rank's sends summed); times are wall-clock medians over
--repeats, with barriers around each. Both results are checked against each other.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


from kasa_ds import KaSAConfig
from kasa_ds.comm.processes import barrier, init_processes
from kasa_ds.placements.tp.spec import ShardSpec
from kasa_ds.placements.tp.truncate import truncate_tensor_parallel, use_gram


@dataclass
class _Target:  # what truncate_tensor_parallel reads from apply_kasa's Target
    name: str
    module: torch.nn.Module
    spec: ShardSpec


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="d of the d×d and d×3.5d weights")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smoke", action="store_true")
    return p.parse_args(argv)


def shapes(a) -> list[tuple[str, int, int]]:
    out = []
    for d in a.sizes:
        wide = int(d * 3.5) // 8 * 8
        out += [(f"{d}x{d}", d, d), (f"{d}x{wide}", d, wide), (f"{wide}x{d}", wide, d)]
    return out


def shard(w: torch.Tensor, dim: int, tp: int, rank: int) -> torch.Tensor:
    return w.chunk(tp, dim=dim)[rank].contiguous()


def kasa_ds_path(w_local, spec, r):
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(w_local.clone(), requires_grad=False)
    truncate_tensor_parallel([_Target("w", module, spec)], KaSAConfig(r=r), show_progress=False)
    return module.weight.detach()


def gather_path(w_local, dim, tp, r):
    rank = dist.get_rank()
    parts = [torch.empty_like(w_local) for _ in range(tp)] if rank == 0 else None
    dist.gather(w_local, parts, dst=0)
    scatter = None
    if rank == 0:
        full = torch.cat(parts, dim=dim)
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        keep = s.numel() - r
        world = (u[:, :keep] * s[:keep]) @ vh[:keep]
        scatter = [c.contiguous() for c in world.chunk(tp, dim=dim)]
    out = torch.empty_like(w_local)
    dist.scatter(out, scatter, src=0)
    return out


def bytes_sent(m, n, dim, tp, r) -> tuple[int, int]:
    """(kasa_ds, gather) bytes sent over all ranks for one weight."""
    spec = ShardSpec(dim, (m, n), (0,) * tp, None)
    d = n if dim == 0 else m
    rows = m if dim == 0 else n
    if use_gram(spec):
        ours = (tp - 1) * d * d * 8 + (tp - 1) * (d * r + 1) * 8  # Gram reduce to the owner + basis broadcast
    else:
        ours = (tp - 1) * (m * n // tp) * 4 + (tp - 1) * ((rows + d) * r + 1) * 8  # float32 gather + factors
    theirs = 2 * (tp - 1) * (m * n // tp) * 4  # float32 gather + scatter of the shards
    return ours, theirs


def timed(fn, repeats):
    times, result = [], None
    for _ in range(repeats):
        barrier()
        tic = time.perf_counter()
        result = fn()
        barrier()
        times.append(time.perf_counter() - tic)
    return statistics.median(times), result


def worker(a) -> None:
    init_processes(backend="gloo")
    tp, rank = dist.get_world_size(), dist.get_rank()
    if rank == 0:
        print(f"{tp} ranks (gloo, CPU, {torch.get_num_threads()} threads each), r={a.r}, median of {a.repeats}\n")
        print(f"{'weight':<12}{'split':<8}{'path':<8}{'kasa_ds MB':>11}{'gather MB':>10}{'bytes ×':>9}"
              f"{'kasa_ds s':>11}{'gather s':>10}{'speed ×':>9}{'max rel diff':>14}")
    for label, m, n in shapes(a):
        w = torch.randn(m, n, generator=torch.Generator().manual_seed(m * 7 + n))
        for dim, split in ((0, "column"), (1, "row")):
            local = shard(w, dim, tp, rank)
            sizes = tuple(c.shape[dim] for c in w.chunk(tp, dim=dim))
            spec = ShardSpec(dim, (m, n), sizes, None)
            t_ours, ours = timed(lambda: kasa_ds_path(local, spec, a.r), a.repeats)
            t_theirs, theirs = timed(lambda: gather_path(local, dim, tp, a.r), a.repeats)
            diff = torch.tensor([((ours - theirs).norm() / theirs.norm()).item()])
            dist.all_reduce(diff, op=dist.ReduceOp.MAX)
            b_ours, b_theirs = bytes_sent(m, n, dim, tp, a.r)
            if rank == 0:
                kind = "gram" if use_gram(spec) else "gather"
                print(f"{label:<12}{split:<8}{kind:<8}{b_ours / 1e6:>11.2f}{b_theirs / 1e6:>10.2f}"
                      f"{b_theirs / b_ours:>9.2f}{t_ours:>11.3f}{t_theirs:>10.3f}{t_theirs / t_ours:>9.2f}"
                      f"{diff.item():>14.1e}", flush=True)
    dist.destroy_process_group()


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.smoke:
        a.sizes, a.r, a.repeats = [64], 4, 1
    if "WORLD_SIZE" in os.environ:
        worker(a)
        return 0
    threads = max(1, (os.cpu_count() or 2) // a.tp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.tp), "--master_port",
           os.environ.get("MASTER_PORT", "29731"), __file__, *(argv if argv is not None else sys.argv[1:])]
    return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


if __name__ == "__main__":
    sys.exit(main())
