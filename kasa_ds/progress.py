"""Progress bars for long work: a tqdm bar on rank 0, a silent stand-in elsewhere (lines still print)."""

from __future__ import annotations

import sys
from typing import Iterable, Optional, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class NullBar:
    """What ranks other than 0 get instead of a bar: iterates like its items, ignores updates."""

    def __init__(self, items=None):
        self.items = items

    def __iter__(self):
        return iter(self.items)

    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *args, **kwargs) -> None: ...
    def close(self) -> None: ...

    def __enter__(self) -> "NullBar":
        return self

    def __exit__(self, *exc) -> None: ...

    @staticmethod
    def write(line: str) -> None:
        print(line, flush=True)


def progress(items: Optional[Iterable[T]] = None, disable: bool = False, **kwargs):
    """A tqdm bar over ``items`` (or a manual one with ``total=``), refreshed at most every second on a terminal and
    every 30 s in a log file; a :class:`NullBar` when ``disable``. Log through ``bar.write`` so lines don't tear it."""
    if disable:
        return NullBar(items)
    return tqdm(items, dynamic_ncols=True, mininterval=1.0 if sys.stderr.isatty() else 30.0, **kwargs)
