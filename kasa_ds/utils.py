"""Small process-level helpers: rank queries, rank-0 progress bars, atomic directory writes."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, TypeVar

import torch.distributed as dist

T = TypeVar("T")


def rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", 0))


def is_rank_zero() -> bool:
    return rank() == 0


class _NullBar:
    """What ranks other than 0 get instead of a bar: iterates like its items, ignores updates."""

    def __init__(self, items=None):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...

    @staticmethod
    def write(line: str) -> None:
        print(line, flush=True)


def progress(items: Optional[Iterable[T]] = None, disable: bool = False, **kwargs):
    """A tqdm bar over ``items`` (or a manual one with ``total=``), refreshed at most every second on a terminal and
    every 30 s in a log file; a no-op bar when ``disable``."""
    if disable:
        return _NullBar(items)
    import sys

    from tqdm.auto import tqdm

    return tqdm(items, dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0, **kwargs)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path`` in one rename, on error it is removed.

    A reader never sees a half-written ``path``: either the old complete one or the new complete one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
