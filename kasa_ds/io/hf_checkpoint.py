"""Streaming access to HF safetensors checkpoints: list tensors from headers, read one at a time, write shards.

Nothing here loads a whole model: a 70B checkpoint is handled one tensor (and one output shard) at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class TensorInfo:
    file: str
    shape: tuple[int, ...]
    dtype: str


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    d = Path(model_dir)
    if (d / INDEX).is_file():
        files = sorted(set(json.loads((d / INDEX).read_text())["weight_map"].values()))
        return [d / f for f in files]
    if (d / SINGLE).is_file():
        return [d / SINGLE]
    if any(d.glob("*.bin")):
        raise FileNotFoundError(f"{d} holds PyTorch .bin weights only; save it with safe_serialization=True first")
    raise FileNotFoundError(f"{d} holds no model.safetensors or {INDEX}")


def _header_bytes(path: Path) -> bytes:
    """The JSON header of a safetensors file, its length checked against the file's size before it is read (a
    corrupted length would otherwise allocate whatever it says); a bad file is one ValueError naming it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file ({size} bytes; truncated?): copy or convert it again")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: corrupted safetensors header (it claims {n:,} bytes of a {size:,}-byte file; "
                             "truncated or damaged): copy or convert the checkpoint again")
        return f.read(n)


def _header(path: Path) -> dict:
    raw = _header_bytes(path)
    try:
        header = json.loads(raw)
        end = max((meta["data_offsets"][1] for key, meta in header.items() if key != "__metadata__"), default=0)
    except (UnicodeDecodeError, ValueError, KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{path}: corrupted safetensors header ({e}): copy or convert the checkpoint again") from None
    if 8 + len(raw) + end > path.stat().st_size:
        raise ValueError(f"{path}: truncated ({path.stat().st_size:,} bytes; its header describes {end:,} bytes of "
                         "tensors): copy or convert the checkpoint again")
    return header


def list_tensors(model_dir: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor's file, shape and dtype, read from the safetensors headers only."""
    out = {}
    for path in weight_files(model_dir):
        for key, meta in _header(path).items():
            if key != "__metadata__":
                out[key] = TensorInfo(path.name, tuple(meta["shape"]), meta["dtype"])
    return out


def read_tensor(model_dir: str | os.PathLike, info: TensorInfo, key: str) -> torch.Tensor:
    with safe_open(str(Path(model_dir) / info.file), "pt") as f:
        return f.get_tensor(key)


def iter_tensors(model_dir: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) in file order, one tensor in memory at a time."""
    for path in weight_files(model_dir):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def weight_digest(model_dir: str | os.PathLike, info: TensorInfo, key: str, sample: int = 64 << 10) -> str:
    """Identity of one stored tensor's contents: SHA-256 of its first and last ``sample`` bytes in the file (two
    models of one layout — a base and its instruct variant — differ there), read through the header's offsets."""
    path = Path(model_dir) / info.file
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        begin, end = json.loads(f.read(n))[key]["data_offsets"]
        start = 8 + n
        digest = hashlib.sha256()
        f.seek(start + begin)
        digest.update(f.read(min(sample, end - begin)))
        if end - begin > sample:
            f.seek(start + max(begin + sample, end - sample))
            digest.update(f.read(end - max(begin + sample, end - sample)))
    return digest.hexdigest()[:16]


def content_digest(model_dir: str | os.PathLike, sample: int = 1 << 20) -> str:
    """A cheap identity of a checkpoint's weights: per file its name, size, header and first and last ``sample``
    bytes of tensor data (another seed, a fine-tuned or perturbed copy of the same shapes all differ there)."""
    h = hashlib.sha256()
    try:
        files = weight_files(model_dir)
    except FileNotFoundError:  # PyTorch .bin weights (from_pretrained reads them): digested as whole files
        files = sorted(Path(model_dir).glob("*.bin"))
        if not files:
            raise ValueError(f"{model_dir} holds no weights (model.safetensors, an index, or .bin files)") from None
    for path in files:
        header = _header_bytes(path) if path.suffix == ".safetensors" else b""
        h.update(f"{path.name}:{path.stat().st_size}:".encode() + header)
        with open(path, "rb") as f:
            f.seek(8 + len(header) if header else 0)
            h.update(f.read(sample))
            f.seek(max(8 + len(header) if header else 0, path.stat().st_size - sample))
            h.update(f.read(sample))
    return h.hexdigest()[:16]


def fingerprint(model_dir: str | os.PathLike) -> dict[str, dict]:
    """Identity of a checkpoint's weights without reading them: per file, its size and the SHA-256 of its header
    (names, shapes, dtypes, byte offsets). Cheap for 70B; a rewrite that keeps sizes and layout goes unnoticed."""
    out = {}
    for path in weight_files(model_dir):
        header = _header_bytes(path)
        out[path.name] = {"bytes": path.stat().st_size, "header_sha256": hashlib.sha256(header).hexdigest()}
    return out


class ShardWriter:
    """Collects tensors into safetensors shards of at most ``max_shard_bytes``; ``close`` writes the HF index."""

    def __init__(self, out_dir: Path, max_shard_bytes: int) -> None:
        self.out_dir, self.max_bytes = out_dir, max_shard_bytes
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | str] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffer_bytes + nbytes > self.max_bytes:
            self._flush()
        self.buffer[key] = tensor.contiguous()
        self.buffer_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        name = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.buffer, str(self.out_dir / name), metadata={"format": "pt"})
        self.weight_map.update({k: name for k in self.buffer})
        self.shards.append(name)
        self.buffer, self.buffer_bytes = {}, 0

    def close(self) -> None:
        if self.buffer or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            (self.out_dir / self.shards[0]).rename(self.out_dir / SINGLE)
            return
        total = len(self.shards)
        renamed = {}
        for i, name in enumerate(self.shards, start=1):
            final = f"model-{i:05d}-of-{total:05d}.safetensors"
            (self.out_dir / name).rename(self.out_dir / final)
            renamed[name] = final
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": {k: renamed[v] for k, v in sorted(self.weight_map.items())}}
        (self.out_dir / INDEX).write_text(json.dumps(index, indent=2))


def module_key(model_name: str, keys: set[str]) -> Optional[str]:
    """The checkpoint name of module ``model_name`` (whose ``.weight`` is in ``keys``): the same name, or the name
    without a head model's base prefix (``bert.encoder...`` in a BertForSequenceClassification, ``encoder...`` in a
    BertModel checkpoint)."""
    candidates = [model_name] + ([model_name.split(".", 1)[1]] if "." in model_name else [])
    return next((c for c in candidates if c + ".weight" in keys), None)
