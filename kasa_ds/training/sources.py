"""Where training data lives (``data.train`` / ``data.eval``): one file, a glob of shards, or a directory written by
``datasets.save_to_disk``; read record by record for checks that name file and line, or opened as a memory-mapped
Arrow dataset through ``datasets`` for tokenization (kasa_ds.training.tokenized).

File kinds by suffix: .jsonl / .json (a list of objects) / .csv / .parquet / .arrow. A glob's shards must share one
kind and are read in sorted order.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import io
import json
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import datasets
import pyarrow.parquet as pq

KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
CACHE_DIR_NAME = ".kasa_ds_cache"


class DataError(ValueError):
    """A malformed data file or record: one line naming the file, the line/row and the fix."""


@dataclass(frozen=True)
class DataSource:
    """The files behind one data setting: ``files`` sorted; ``kind`` json | csv | parquet | arrow | saved (a
    save_to_disk directory, ``files`` = that directory)."""
    spec: str
    files: tuple[str, ...]
    kind: str

    def records(self) -> Iterator[tuple[str, dict]]:
        """(where, record) for every record, streamed: ``where`` is "file:line" (JSONL), "file: record N" (JSON,
        CSV) or "file: row N" (Parquet, Arrow, saved). DataError for invalid JSON, non-UTF-8 bytes, a non-object."""
        for path in self.files:
            for where, record in _READERS[self.kind if not path.endswith(".jsonl") else "jsonl"](path):
                if not isinstance(record, dict):
                    raise DataError(f"{where}: a {type(record).__name__}, not an object with fields; each record "
                                    "must be one JSON object")
                yield where, record

    @cached_property
    def digest(self) -> str:
        """A cheap identity of the contents: per file, its name, size and the SHA-256 of its first and last MiB
        (read once per DataSource: the check marker, the token cache and the resume fingerprint all use it)."""
        digest = hashlib.sha256()
        for path in self.files:
            root = Path(path)
            for f in sorted(root.rglob("*")) if root.is_dir() else [root]:
                if f.is_file() and CACHE_DIR_NAME not in f.parts:
                    _hash_file(digest, f, f.relative_to(root) if root.is_dir() else f.name)
        return digest.hexdigest()[:16]

    def modified(self) -> str:
        """The files' modification times: a cache keyed by digest and this misses an edit that keeps the size and
        the first and last MiB (the resume fingerprint uses the digest only: a copied data set still resumes)."""
        stamps = [os.stat(f).st_mtime_ns for path in self.files
                  for f in ([path] if not os.path.isdir(path) else sorted(map(str, Path(path).rglob("*.arrow"))))]
        return hashlib.sha256(str(stamps).encode()).hexdigest()[:16]

    def open(self, cache_dir: Path) -> datasets.Dataset:
        """The records as a memory-mapped Arrow dataset (datasets' own conversion cached under ``cache_dir``)."""
        if self.kind == "saved":
            return datasets.load_from_disk(self.files[0])
        try:
            return datasets.load_dataset(self.kind, data_files=list(self.files), split="train",
                                         cache_dir=str(cache_dir / "raw"))
        except (datasets.exceptions.DatasetGenerationError, ValueError, TypeError) as e:
            cause = e.__cause__ or e
            raise DataError(f"{self.spec}: datasets cannot read these records as one table ({type(cause).__name__}: "
                            f"{str(cause).splitlines()[0][:200]}); give every record the same fields and types")

    def cache_dir(self, override: str | None = None) -> Path:
        """Where tokenized examples are cached: ``override``, else beside the data (<data dir>/.kasa_ds_cache), else
        (a read-only data directory) ~/.cache/kasa_ds/tokenized/<hash of the data's path>."""
        if override:
            return Path(override)
        first = Path(self.files[0])
        beside = (first if self.kind == "saved" else first.parent) / CACHE_DIR_NAME
        if os.access(beside if beside.exists() else beside.parent, os.W_OK):
            return beside
        key = hashlib.sha256(str(first.resolve()).encode()).hexdigest()[:16]
        return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kasa_ds" / "tokenized" / key


def resolve(spec: str) -> DataSource:
    """The DataSource a data setting names; DataError when nothing matches, a suffix is unknown, or shards mix kinds."""
    if os.path.isdir(spec):
        if not (Path(spec) / "dataset_info.json").exists() and not (Path(spec) / "state.json").exists():
            if (Path(spec) / "dataset_dict.json").exists():
                raise DataError(f"{spec} holds a DatasetDict: point data.train / data.eval at one split's directory")
            raise DataError(f"{spec} is a directory but not a datasets.save_to_disk one; name its files or a glob "
                            f"such as {spec}/*.jsonl")
        return DataSource(spec, (spec,), "saved")
    files = sorted(glob.glob(spec)) if glob.has_magic(spec) else [spec]
    if not files or not all(os.path.isfile(f) for f in files):
        what = "no file matches" if glob.has_magic(spec) else "no such file"
        raise DataError(f"{spec}: {what}; set data.train / data.eval to a file, a glob of shards or a save_to_disk "
                        "directory")
    kinds = {KINDS.get(Path(f).suffix) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix not in KINDS)
        raise DataError(f"{bad}: unsupported data file; use {', '.join(KINDS)} or a datasets.save_to_disk directory")
    if len(kinds) > 1:
        raise DataError(f"{spec}: the shards mix file kinds ({', '.join(sorted(kinds))}); use one kind per setting")
    return DataSource(spec, tuple(files), kinds.pop())


def _hash_file(digest, f: Path, name) -> None:
    size = f.stat().st_size
    digest.update(f"{name}:{size}".encode())
    with open(f, "rb") as handle:
        digest.update(handle.read(1 << 20))
        if size > 2 << 20:
            handle.seek(-(1 << 20), os.SEEK_END)
            digest.update(handle.read())


def _utf8(path: str, data: bytes, line: int, offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line += data[:e.start].count(b"\n")
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {offset + e.start}); "
                        "re-encode the file as UTF-8") from None


def _jsonl(path: str) -> Iterator[tuple[str, object]]:
    offset = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            line = _utf8(path, raw, number, offset)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno}); fix or remove that "
                                "line") from None


def _json(path: str) -> Iterator[tuple[str, object]]:
    text = _utf8(path, Path(path).read_bytes(), 1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records (or use .jsonl, one object per line)")
    for number, record in enumerate(data, start=1):
        yield f"{path}: record {number}", record


def _csv(path: str) -> Iterator[tuple[str, object]]:
    text = _utf8(path, Path(path).read_bytes(), 1)
    for number, record in enumerate(csv.DictReader(io.StringIO(text)), start=1):
        yield f"{path}: record {number}", record


def _table(path: str, kind: str) -> Iterator[tuple[str, object]]:
    if kind == "parquet":
        rows = (row for batch in pq.ParquetFile(path).iter_batches(batch_size=1024) for row in batch.to_pylist())
    else:
        rows = iter(datasets.load_from_disk(path) if kind == "saved" else datasets.Dataset.from_file(path))
    for number, record in enumerate(rows, start=1):
        yield f"{path}: row {number}", record


_READERS = {"jsonl": _jsonl, "json": _json, "csv": _csv,
            "parquet": lambda p: _table(p, "parquet"), "arrow": lambda p: _table(p, "arrow"),
            "saved": lambda p: _table(p, "saved")}
