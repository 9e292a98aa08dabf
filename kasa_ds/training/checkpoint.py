"""Training checkpoints: <output_dir>/checkpoints/step-NNNNNNN, each complete or absent.

A checkpoint is written into a hidden temporary directory and renamed into place only after every rank has
finished writing, so a crash never leaves a half-written checkpoint that ``--resume auto`` would pick. It holds the
adapter (PEFT keys), the trainer state (optimizer, schedule, step, RNG) and meta.json with the fingerprint of the
run it belongs to; resuming a run with another model, rank or targets is refused before anything is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..dist.comm import rank
from .config import TrainConfig

STEP_DIR = re.compile(r"^step-(\d{7})$")
META = "meta.json"


def checkpoint_root(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def latest_checkpoint(output_dir: str | os.PathLike) -> Optional[Path]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir())
    return steps[-1][1] if steps else None


def begin(output_dir: str | os.PathLike, step: int) -> Path:
    """The temporary directory every rank writes step ``step`` into (same path on all ranks)."""
    tmp = checkpoint_root(output_dir) / f".step-{step:07d}.tmp"
    if rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    return tmp


def commit(tmp: Path, meta: dict[str, Any], keep: int) -> Path:
    """After all ranks wrote into ``tmp``: rank 0 writes meta.json, renames into place, prunes old checkpoints."""
    _barrier()
    final = tmp.with_name(tmp.name[1:].removesuffix(".tmp"))
    if rank() == 0:
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=2)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        complete = sorted(p for p in final.parent.iterdir() if STEP_DIR.match(p.name))
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def read_meta(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """meta.json of a checkpoint, checked against this run's fingerprint; raises a clear error on mismatch."""
    meta_file = path / META
    if not meta_file.is_file():
        raise ValueError(f"{path} is not a complete kasa_ds checkpoint (no {META}); pass another with "
                         "resume=<dir> or resume=none")
    try:
        with open(meta_file) as f:
            meta = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file} is corrupted ({e}); pass another checkpoint with resume=<dir>") from None
    theirs = meta.get("fingerprint", {})
    diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
    if diff:
        detail = "; ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"{path} belongs to another run ({detail}); use another output_dir or resume=none")
    return meta


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several error types for truncated or garbled files
        raise ValueError(f"{path} is corrupted ({type(e).__name__}: {e}); resume from another checkpoint") from None


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def run_fingerprint(cfg: TrainConfig) -> dict:
    """What a checkpoint must share with this run to be resumed (model, method, data, batch geometry)."""
    k = cfg.kasa
    return {"model": cfg.model.path, "task": cfg.model.task, "r": k.r, "alpha": k.alpha,
            "target_modules": k.target_modules, "modules_to_save": k.modules_to_save, "train_data": cfg.data.train,
            "micro_batch_size": cfg.train.micro_batch_size, "seed": cfg.train.seed,
            "gradient_accumulation_steps": cfg.train.gradient_accumulation_steps}


def find_resume_checkpoint(cfg: TrainConfig, fingerprint: dict) -> Optional[Path]:
    """The checkpoint this run continues from (None: a fresh run), validated against ``fingerprint``."""
    if cfg.resume == "none":
        return None
    path = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if path is not None:
        read_meta(path, fingerprint)  # refuse a mismatched or corrupted checkpoint before any work
    return path


def save_rng(directory: Path, rank_: int) -> None:
    torch.save(torch.get_rng_state(), directory / f"rng_state_rank{rank_}.pt")


def restore_rng(directory: Path, rank_: int) -> None:
    path = directory / f"rng_state_rank{rank_}.pt"
    if path.is_file():
        torch.set_rng_state(torch.load(path, weights_only=True))
