"""A precomputed truncation: the dropped factors of every target weight of a checkpoint, reused across runs.

Layout of a cache directory (written by :func:`write_svd_cache`, the ``kasa-precompute-svd`` command):
    kasa_svd_cache.json          {"fingerprint": {model files, r, solver}, "entries": {key: file},
                                  "digests": {key: digest of the weight's stored bytes}}
    factors-rank00000.safetensors  <key>.left (m×r), <key>.right (r×n), float32; one file per writing rank
``key`` is the weight's module name as in the checkpoint. A cache is used only if the model files (sizes and
safetensors headers), r, the solver and every weight's contents (a digest of its first and last 64 KiB as stored:
another model of the same layout is refused) all match; otherwise loading it fails naming what differs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from ..comm.collectives import is_rank_zero, rank as rank_of, world_size
from ..comm.processes import barrier
from ..comm.schedule import WorkItem, assign_owners
from ..config import KaSAConfig
from ..core.truncation import check_rank, tail_factors
from ..core.types import LayerReport, Target
from ..progress import progress
from .hf_checkpoint import TensorInfo, fingerprint, list_tensors, module_key, read_tensor, weight_digest

INDEX = "kasa_svd_cache.json"


def cache_fingerprint(model_dir: str | os.PathLike, config: KaSAConfig) -> dict:
    return {"model_files": fingerprint(model_dir), "r": config.r, "svd_solver": config.svd_solver}


class SVDCache:
    """Read access to a cache directory, validated against a model directory and a KaSAConfig."""

    def __init__(self, cache_dir: str | os.PathLike, model_dir: str | os.PathLike, config: KaSAConfig) -> None:
        self.dir = Path(cache_dir)
        index_file = self.dir / INDEX
        if not index_file.is_file():
            raise FileNotFoundError(f"{self.dir} is not a KaSA SVD cache (no {INDEX}); write one with "
                                    "tools/precompute_svd.py")
        index = json.loads(index_file.read_text())
        expected = cache_fingerprint(model_dir, config)
        diff = [k for k in expected if index["fingerprint"].get(k) != expected[k]]
        if diff:
            raise ValueError(f"SVD cache {self.dir} was made for other {', '.join(diff)} (cache: "
                             f"{ {k: index['fingerprint'].get(k) for k in diff if k != 'model_files'} }); "
                             "recompute it with tools/precompute_svd.py or drop kasa.svd_cache")
        self.entries: dict[str, str] = index["entries"]
        tensors = list_tensors(model_dir)
        digests = index.get("digests")
        if digests is None or set(digests) != set(self.entries):
            raise ValueError(f"SVD cache {self.dir} records no digest of the weights it was computed from (written "
                             "by kasa_ds 0.1): recompute it with tools/precompute_svd.py")
        changed = [k for k, digest in digests.items()
                   if weight_digest(model_dir, tensors[k + ".weight"], k + ".weight") != digest]
        if changed:
            raise ValueError(f"SVD cache {self.dir} was computed from other weights than {model_dir} ({len(changed)} "
                             f"differ, e.g. {changed[0]}): a model of the same layout (a base vs its instruct "
                             "variant?); recompute it with tools/precompute_svd.py for this model")

    def keys(self) -> set[str]:
        return {k + ".weight" for k in self.entries}

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(str(self.dir / self.entries[key]), "pt") as f:
            return f.get_tensor(key + ".left"), f.get_tensor(key + ".right")

    def truncate(self, targets: list[Target], config: KaSAConfig, show_progress: bool = True,
                 name_of: Callable[[str], str] = str) -> list[LayerReport]:
        """Step 2 of apply_kasa from the cache: each rank applies the factors to what it holds through the target's
        format and placement (its ZeRO-3 shard, its TP rows, the whole weight); no gather, no SVD, no collective.
        ``name_of``: a target's module name as the checkpoint names it (a Megatron model's projections: the HF
        model's, kasa_ds.inject.adapter_module_name), whose factors are in the checkpoint's (TP=1) layout."""
        keys = self.keys()
        names = {t.name: module_key(name_of(t.name), keys) for t in targets}
        missing = [name for name, key in names.items() if key is None]
        if missing:
            raise ValueError(f"SVD cache {self.dir} has no entry for {len(missing)} targets (e.g. {missing[:2]}); it "
                             "was made for other target_modules: recompute it")
        reports = []
        bar_off = not (show_progress and is_rank_zero())
        for t in progress(targets, desc="KaSA truncation (cache)", unit="layer", disable=bar_off):
            tic = time.perf_counter()
            left, right = self.factors(names[t.name])
            device = t.placement.holding_device(t)
            with torch.no_grad():
                t.format.apply_tail(t, left.to(device), right.to(device), config, t.placement.subtract)
            reports.append(LayerReport(t.name, t.shape, float("nan"), time.perf_counter() - tic))
        return reports


DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def cache_targets(model_dir: str | os.PathLike, config: KaSAConfig) -> tuple[dict[str, TensorInfo], list[str]]:
    """(the checkpoint's tensors from its headers, the 2-D weights ``config`` targets); ValueError naming the fix
    when nothing matches or r does not fit a weight. Reads headers only."""
    tensors = list_tensors(model_dir)
    names = [k.removesuffix(".weight") for k, info in tensors.items()
             if k.endswith(".weight") and len(info.shape) == 2 and config.is_target(k.removesuffix(".weight"))]
    if not names:
        raise ValueError(f"--targets {','.join(config.target_modules)} matched no 2-D weight in {model_dir}")
    for name in names:
        check_rank(config.r, tensors[name + ".weight"].shape, name)
    return tensors, names


def write_svd_cache(model_dir: str | os.PathLike, config: KaSAConfig, out: str | os.PathLike) -> Path:
    """Truncate every target weight of the checkpoint at ``model_dir`` once and write the factors to ``out``.

    Collective over the default process group when there is one: the weights are spread over the ranks by SVD cost
    (kasa_ds.comm.schedule.assign_owners), each rank reads only its own weights' bytes and writes their factors into
    a temporary sibling of ``out``; rank 0 writes the index and renames it into place."""
    tensors, names = cache_targets(model_dir, config)
    rank, world = rank_of(), world_size()
    items = [WorkItem(n, tensors[n + ".weight"].shape, DTYPE_BYTES.get(tensors[n + ".weight"].dtype, 4)
                      * tensors[n + ".weight"].shape[0] * tensors[n + ".weight"].shape[1]) for n in names]
    mine = [items[x.index].name for x in assign_owners(items, world) if x.owner == rank]
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    factors, bad, tic = {}, [], time.perf_counter()
    for name in progress(mine, desc=f"SVD ({world} ranks)", unit="weight", disable=rank != 0):
        weight = read_tensor(model_dir, tensors[name + ".weight"], name + ".weight")
        if not torch.isfinite(weight).all():
            bad.append(name)  # decided together below: every rank fails the same way, no rank left waiting
            continue
        tail = tail_factors(weight, config.r, config.svd_solver)
        factors[name + ".left"], factors[name + ".right"] = tail.left.float().contiguous(), tail.right.float()
    file = f"factors-rank{rank:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in factors.items()}, str(tmp / file))
    owners = [({n: file for n in mine}, bad)] * world
    if world > 1:
        dist.all_gather_object(owners, ({n: file for n in mine}, bad))
    nonfinite = sorted(n for _, part in owners for n in part)
    if nonfinite:
        barrier()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"{model_dir}: {nonfinite[0]}.weight holds NaN or inf ({len(nonfinite)} weight(s)): no "
                         "truncation of it can be cached; nothing was written")
    if rank == 0:
        entries = {n: f for part, _ in owners for n, f in part.items()}
        digests = {n: weight_digest(model_dir, tensors[n + ".weight"], n + ".weight") for n in entries}
        (tmp / INDEX).write_text(json.dumps({"fingerprint": cache_fingerprint(model_dir, config), "entries": entries,
                                             "digests": digests, "targets": config.target_modules}, indent=1))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
        print(f"SVD cache for {len(entries)} weights written to {out} ({time.perf_counter() - tic:.1f}s on rank 0)")
    barrier()
    return out
