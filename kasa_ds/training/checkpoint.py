"""Training checkpoints: <output_dir>/checkpoints/step-NNNNNNN, each complete or absent.

A checkpoint is written into a hidden temporary directory and renamed into place only after every rank has
finished writing, so a crash never leaves a half-written checkpoint that ``--resume auto`` would pick. It holds the
adapter (PEFT keys), the trainer state (optimizer, schedule, step, RNG) and meta.json: the run's id, the fingerprint
of every setting that changes the trajectory (data contents included) and the files written. Resuming with other
settings, or from a checkpoint missing a file, is refused before anything is loaded, naming what differs; pruning
removes only the current run's older checkpoints.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from ..comm.collectives import rank
from ..comm.processes import barrier
from ..io import seal
from .config import ADAPTER_FIELDS, TrainConfig, zero_stage

DEEPSPEED_DIR = "deepspeed"  # the engine's files inside a checkpoint (kasa_ds.training.backends)
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
    barrier()
    return tmp


def commit(tmp: Path, meta: dict[str, Any], keep: int) -> Path:
    """After all ranks wrote into ``tmp``: rank 0 writes meta.json (with the list of files every rank wrote), renames
    into place, and prunes the older checkpoints of the same run (``meta["run_id"]``), never another run's."""
    barrier()
    final = tmp.with_name(tmp.name[1:].removesuffix(".tmp"))
    if rank() == 0:
        meta = {**meta, "files": sorted(p.name for p in tmp.iterdir()), "seal": seal.seal(tmp, exclude=(META,))}
        with open(tmp / META, "w") as f:
            json.dump(meta, f, indent=2)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        mine = sorted(p for p in final.parent.iterdir() if STEP_DIR.match(p.name) and _run_id(p) == meta.get("run_id"))
        for old in mine[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def _run_id(path: Path) -> Optional[str]:
    try:
        return json.loads((path / META).read_text()).get("run_id")
    except (OSError, ValueError):
        return None


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
        hint = " (model.weights: model.path now holds other weights; allow_other_base=true resumes on a base changed on " \
            "purpose)" if "model.weights" in diff else ""
        raise ValueError(f"{path} was written with other settings ({detail}): resuming would not continue that "
                         f"trajectory{hint}. Restore those settings, use another output_dir, or resume=none")
    absent = [f for f in meta.get("files", []) if not (path / f).exists()]
    if absent:
        raise ValueError(f"{path} is incomplete: {', '.join(absent[:3])} missing; resume from another checkpoint "
                         "(resume=<dir>) or start over (resume=none)")
    return meta


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises several error types for truncated or garbled files
        raise ValueError(f"{path} is corrupted ({type(e).__name__}: {e}); resume from another checkpoint") from None


#: settings that change a run's trajectory: a checkpoint resumes only a run that agrees on all of them
TRAJECTORY_KEYS = {
    "model": ("path", "task", "num_labels", "dtype", "max_length", "quantize", "double_quant"),
    "kasa": ADAPTER_FIELDS,  # every KaSAConfig field
    "train": ("micro_batch_size", "gradient_accumulation_steps", "lr", "weight_decay", "warmup_steps", "lr_schedule",
              "max_grad_norm", "seed", "optimizer", "autocast"),
    "data": ("train", "text_field", "label_field"),
}


def run_fingerprint(cfg: TrainConfig, train_contents: str, weights: Optional[str] = None, world: int = 1) -> dict:
    """What a checkpoint must share with this run to be resumed: every trajectory setting, the training data's
    contents (``train_contents``: kasa_ds.training.sources.DataSource.digest), the base weights (``weights``:
    kasa_ds.io.hf_checkpoint.content_digest; not with ``allow_other_base``), how the run is laid out (data-parallel
    size, tensor parallelism, ZeRO stage, backend: a change alters the global batch or the state's layout), and
    max_steps where the schedule depends on it (cosine, linear: extending a run changes its decay)."""
    out = {f"{section}.{key}": getattr(getattr(cfg, section), key)
           for section, keys in TRAJECTORY_KEYS.items() for key in keys}
    out["data.train_contents"] = train_contents
    if weights is not None and not cfg.allow_other_base:
        out["model.weights"] = weights
    out.update({"run.data_parallel": world // (cfg.tensor_parallel * cfg.pipeline_parallel),
                "run.tensor_parallel": cfg.tensor_parallel,
                "run.backend": "deepspeed" if cfg.ds_config else "plain", "run.zero_stage": zero_stage(cfg.ds_config)})
    if cfg.backend == "megatron":  # its adapter and optimizer state are saved whole: any TP and PP size resumes
        out.update({"run.backend": "megatron", "run.tensor_parallel": "any"})
    if cfg.train.lr_schedule != "constant":
        out["train.max_steps"] = cfg.train.max_steps
    return out


def find_resume_checkpoint(cfg: TrainConfig, fingerprint: dict) -> tuple[Optional[Path], dict]:
    """The checkpoint this run continues from and its meta.json (None, {}: a fresh run), validated against
    ``fingerprint``: a mismatched, corrupted, incomplete or foreign one (pickles this user's runs did not seal,
    kasa_ds.io.seal; ``trust_checkpoint``: load it anyway) is refused before any work."""
    if cfg.resume == "none":
        return None, {}
    path = latest_checkpoint(cfg.output_dir) if cfg.resume == "auto" else Path(cfg.resume)
    if path is None:
        return None, {}
    meta = read_meta(path, fingerprint)
    # DeepSpeed's engine state is unpickled with weights_only=False; the plain backend loads weights_only=True
    if not cfg.trust_checkpoint and seal.holds_pickles(path / DEEPSPEED_DIR):
        reason = seal.unsealed_reason(path, meta.get("seal"), exclude=(META,))
        if reason is not None:
            raise ValueError(seal.refusal(path, reason, "trust_checkpoint=true"))
    return path, meta


class DiskFull(RuntimeError):
    """A checkpoint could not be written for lack of space; earlier checkpoints are intact."""


def abort_if_disk_full(output_dir: str | os.PathLike, tmp: Path, step: int, error: BaseException) -> None:
    """After a failed checkpoint write: remove the partial temporary directory, and if the disk is (nearly) full say
    so — where, how much is free, how much a checkpoint takes — instead of the writer's own message."""
    shutil.rmtree(tmp, ignore_errors=True)
    root = checkpoint_root(output_dir)
    free = shutil.disk_usage(root if root.exists() else output_dir).free
    previous = latest_checkpoint(output_dir)
    needed = sum(f.stat().st_size for f in previous.rglob("*") if f.is_file()) if previous else None
    if getattr(error, "errno", None) == 28 or free < (needed or 1 << 20):  # ENOSPC, or no room for another one
        size = f"{needed / 2 ** 20:.1f} MiB like the last one" if needed else "more"
        raise DiskFull(f"the disk holding {root} is full: writing checkpoint step-{step:07d} failed with "
                       f"{free / 2 ** 20:.1f} MiB free (it needs {size}); free space or set output_dir on a larger "
                       "disk and resume — the earlier checkpoints are intact") from error


def save_rng(directory: Path, rank_: int) -> None:
    """The CPU generator's state, and every CUDA device's on a GPU machine."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(state, directory / f"rng_state_rank{rank_}.pt")


def restore_rng(directory: Path, rank_: int) -> None:
    """Restore this rank's generators; a rank the checkpoint has no state for (resuming at a larger world size)
    keeps its seed-derived state."""
    path = directory / f"rng_state_rank{rank_}.pt"
    if not path.is_file():
        return
    state = torch.load(path, weights_only=True)
    if isinstance(state, torch.Tensor):  # kasa_ds 0.1 checkpoints: the CPU state alone
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def move_aside(output_dir: str | os.PathLike) -> Optional[Path]:
    """A fresh run (resume=none) in a directory holding an earlier run: move that run's files into
    <output_dir>/previous-runs/<time>/ (nothing is deleted). Returns where they went, or None if there were none."""
    root = Path(output_dir)
    names = [n for n in ("checkpoints", "adapter", "metrics.jsonl", "config.yaml", "tensorboard")
             if (root / n).exists()]
    if not names:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidates = (root / "previous-runs" / (stamp + (f"-{i}" if i else "")) for i in range(1000))
    target = next(t for t in candidates if not t.exists())
    target.mkdir(parents=True)
    for name in names:
        (root / name).rename(target / name)
    return target
