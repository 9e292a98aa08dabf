"""Tokenized examples cached beside the data: each data setting is encoded once with ``datasets.map`` into an Arrow
file that later runs memory-map, so a large file is neither re-tokenized per run nor held as Python objects.

A cache file is named by a key over everything that decides its rows: the data's content digest and modification
times, the tokenizer
(vocabulary, special tokens, chat template, how it encodes a probe), and the Encoding (task, format, max_length,
train_on_prompt, overlong, fields). Record checks (before the model loads) are cached the same way. Rank 0 builds,
the other ranks wait and read; a rank that still finds nothing (a node-local disk) builds its own copy. Files are
written under a temporary name and renamed, so an interrupted build leaves no half-written cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import datasets
import torch

from ..io.files import atomic_file
from .data import check_stream, encode_classification, encode_example
from .sources import DataSource

CACHE_VERSION = 1
PROBE = "kasa_ds probe: Hello, world! 123"


@dataclass(frozen=True)
class Encoding:
    """How records become examples. task seq_cls: {input_ids, labels: int}; causal_lm: {input_ids, labels: list}."""
    task: str
    fmt: str
    max_length: int
    train_on_prompt: bool = False
    overlong: str = "truncate"
    text_field: str = "text"
    label_field: str = "label"

    def encode(self, record: dict, tokenizer, where: str) -> tuple[list[int], object, str]:
        """(input_ids, labels, fate): fate kept | truncated | dropped (kasa_ds.training.data.encode_example)."""
        if self.task == "seq_cls":
            ids, label = encode_classification(record, tokenizer, self.max_length, self.text_field, self.label_field)
            return ids, label, "kept"
        return encode_example(record, self.fmt, tokenizer, self.max_length, self.train_on_prompt, self.overlong,
                              where)


class TokenizedDataset(torch.utils.data.Dataset):
    """Rows {input_ids, labels} of a memory-mapped Arrow table; ``lengths`` per row; ``truncated``/``dropped``
    counted when the cache was built; ``cached``: whether this run read it rather than built it."""

    def __init__(self, table: datasets.Dataset, truncated: int = 0, dropped: int = 0, cached: bool = False,
                 path: Optional[Path] = None) -> None:
        self.table, self.truncated, self.dropped, self.cached, self.path = table, truncated, dropped, cached, path

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, i: int) -> dict:
        row = self.table[int(i)]
        return {"input_ids": row["input_ids"], "labels": row["labels"]}

    @property
    def lengths(self) -> list[int]:
        return self.table.data.column("length").to_pylist()

    def head(self, n: int) -> "TokenizedDataset":
        return TokenizedDataset(self.table.select(range(min(n, len(self)))), cached=self.cached, path=self.path)


def tokenized(source: DataSource, encoding: Encoding, tokenizer, cache_dir: Path, builder: bool,
              barrier: Callable[[], None]) -> TokenizedDataset:
    """The source's examples, from the cache or encoded now. Collective: every rank calls it (``builder`` on rank
    0), ``barrier`` synchronizes them."""
    key = _key(source.digest + source.modified(), tokenizer_fingerprint(tokenizer), asdict(encoding))
    arrow, meta = cache_dir / f"tokens-{key}.arrow", cache_dir / f"tokens-{key}.json"
    built = False
    if builder and not meta.exists():
        _build(source, encoding, tokenizer, arrow, meta)
        built = True
    barrier()
    if not meta.exists():  # this rank does not see rank 0's disk
        _build(source, encoding, tokenizer, arrow, meta)
        built = True
    counts = json.loads(meta.read_text())
    return TokenizedDataset(datasets.Dataset.from_file(str(arrow)), counts["truncated"], counts["dropped"],
                            cached=not built, path=arrow)


def checked(source: DataSource, cache_dir: Path, task: str, fmt: str, text_field: str, label_field: str,
            num_labels: Optional[int]) -> tuple[str, int]:
    """(format, record count) of a source whose every record passed kasa_ds.training.data.check_stream — checked now
    (DataError at the first bad record) or earlier for the same contents and settings (a marker in the cache)."""
    settings = {"task": task, "fmt": fmt, "text_field": text_field, "label_field": label_field,
                "num_labels": num_labels if task == "seq_cls" else None}
    marker = cache_dir / f"checked-{_key(source.digest + source.modified(), '', settings)}.json"
    if marker.exists():
        found = json.loads(marker.read_text())
        return found["format"], found["records"]
    fmt, count = check_stream(source.records(), source.spec, task, text_field, label_field, fmt, num_labels)
    try:
        _write_json(marker, {"format": fmt, "records": count, "source": source.spec})
    except OSError:  # an unwritable cache costs a re-check next run, nothing else
        pass
    return fmt, count


def tokenizer_fingerprint(tokenizer) -> str:
    """What decides how a tokenizer encodes: its vocabulary and merges, special tokens, chat template, class, and
    the ids of a probe string (special tokens it adds)."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else
                  json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps([type(tokenizer).__name__, tokenizer.chat_template, sorted(tokenizer.all_special_ids),
                              tokenizer.eos_token_id, tokenizer(PROBE)["input_ids"]], default=str).encode())
    return digest.hexdigest()[:16]


def _build(source: DataSource, encoding: Encoding, tokenizer, arrow: Path, meta: Path) -> None:
    arrow.parent.mkdir(parents=True, exist_ok=True)
    raw = source.open(arrow.parent)
    records = len(raw)

    def encode_batch(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "length": [], "truncated": []}
        for n, index in enumerate(indices):
            record = {column: values[n] for column, values in batch.items()}
            ids, labels, fate = encoding.encode(record, tokenizer, f"{source.spec}: record {index + 1}")
            if fate != "dropped":
                out["input_ids"].append(ids)
                out["labels"].append(labels)
                out["length"].append(len(ids))
                out["truncated"].append(fate == "truncated")
        return out

    partial = arrow.with_name(arrow.name + ".partial")  # datasets writes its own temporary file, then moves it here
    table = raw.map(encode_batch, batched=True, with_indices=True, remove_columns=raw.column_names,
                    cache_file_name=str(partial), load_from_cache_file=False, new_fingerprint=arrow.stem,
                    desc=f"tokenizing {source.spec}")
    rows = len(table)  # an empty table (every record dropped) has no columns at all
    truncated = int(sum(table.data.column("truncated").to_pylist())) if rows else 0
    del table
    os.replace(partial, arrow)
    _write_json(meta, {"records": records, "examples": rows, "truncated": truncated, "dropped": records - rows,
                       "source": source.spec})


def _key(digest: str, tokenizer: str, settings: dict) -> str:
    text = json.dumps({"version": CACHE_VERSION, "data": digest, "tokenizer": tokenizer, **settings}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _write_json(path: Path, content: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(content))
