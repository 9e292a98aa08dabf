"""A precomputed truncation: the dropped factors of every target weight of a checkpoint, reused across runs.

Layout of a cache directory (written by tools/precompute_svd.py):
    kasa_svd_cache.json          {"fingerprint": {model files, r, solver}, "entries": {key: file}}
    factors-rank00000.safetensors  <key>.left (m×r), <key>.right (r×n), float32; one file per writing rank
``key`` is the weight's module name as in the checkpoint. A cache is used only if the model files (sizes and
safetensors headers), r and the solver all match; otherwise loading it fails with a message naming what differs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from safetensors import safe_open

from ..config import KaSAConfig
from ..core.types import LayerReport, Target
from ..dist.comm import is_rank_zero
from ..progress import progress
from .hf_checkpoint import fingerprint, module_key

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

    def keys(self) -> set[str]:
        return {k + ".weight" for k in self.entries}

    def factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        with safe_open(str(self.dir / self.entries[key]), "pt") as f:
            return f.get_tensor(key + ".left"), f.get_tensor(key + ".right")

    def truncate(self, targets: list[Target], config: KaSAConfig, show_progress: bool = True) -> list[LayerReport]:
        """Step 2 of apply_kasa from the cache: each rank applies the factors to what it holds through the target's
        format and placement (its ZeRO-3 shard, its TP rows, the whole weight); no gather, no SVD, no collective."""
        keys = self.keys()
        names = {t.name: module_key(t.name, keys) for t in targets}
        missing = [name for name, key in names.items() if key is None]
        if missing:
            raise ValueError(f"SVD cache {self.dir} has no entry for {len(missing)} targets (e.g. {missing[:2]}); it "
                             "was made for other target_modules: recompute it")
        reports = []
        bar_off = not (show_progress and is_rank_zero())
        for t in progress(targets, desc="KaSA truncation (cache)", unit="layer", disable=bar_off):
            tic = time.perf_counter()
            left, right = self.factors(names[t.name])
            weight = t.module.weight
            device = weight.ds_tensor.device if hasattr(weight, "ds_tensor") else weight.device
            with torch.no_grad():
                t.format.apply_tail(t, left.to(device), right.to(device), config, t.placement.subtract)
            reports.append(LayerReport(t.name, t.shape, float("nan"), time.perf_counter() - tic))
        return reports
