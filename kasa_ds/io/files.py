"""Outputs: never destroy user data (:func:`check_output_dir`, :func:`check_output_file`), and write atomically
(:func:`atomic_directory`, :func:`atomic_file`: a reader sees the old complete output or the new one, never a
half-written one)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional


def check_output_dir(out: str | os.PathLike, previous: Optional[Callable[[Path], bool]], *,
                     sources: Iterable[str | os.PathLike] = (), models: Iterable[str | os.PathLike] = (),
                     what: str = "--out") -> None:
    """Refuse, before any work, an output directory whose replacement would destroy data: one that equals or contains
    a ``source`` or ``model`` (or lies inside a model directory), or one that is non-empty and not a previous output
    of the same kind (``previous(out)``; None: no kind may be replaced). Raises ValueError naming the fix."""
    out = Path(out).resolve()
    for path, is_model in [(Path(p), False) for p in sources] + [(Path(p), True) for p in models]:
        path = path.resolve()
        if out == path or out in path.parents or (is_model and path in out.parents):
            relation = "is" if out == path else ("contains" if out in path.parents else "lies inside")
            raise ValueError(f"{what} {out} {relation} {path}, which this command reads and never overwrites; "
                             "choose a new directory")
    if out.is_dir() and any(out.iterdir()) and not (previous is not None and previous(out)):
        kind = "" if previous is None else " and is not an earlier output of this command"
        raise ValueError(f"{what} {out} exists, is not empty{kind}: choose a new directory (nothing was written)")
    if out.exists() and not out.is_dir():
        raise ValueError(f"{what} {out} is a file: choose a directory path")


def check_output_file(out: str | os.PathLike, suffix: str, *, models: Iterable[str | os.PathLike] = (),
                      what: str = "--out") -> None:
    """Refuse, before any work, an output file path that is not ``*{suffix}``, is a directory, or lies inside a
    ``model`` directory (which this command reads and never changes). Raises ValueError naming the fix."""
    out = Path(out).resolve()
    if out.suffix != suffix:
        raise ValueError(f"{what} {out} does not end in {suffix}: name the file <name>{suffix}")
    if out.is_dir():
        raise ValueError(f"{what} {out} is a directory: name a {suffix} file")
    for model in models:
        if Path(model).resolve() in out.parents:
            raise ValueError(f"{what} {out} lies inside {Path(model).resolve()}, which this command reads and never "
                             "changes; choose another path")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path``; on success it replaces ``path`` in one rename, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the result follows the umask like mkdir
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


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling path of ``path`` to write; on success it replaces ``path`` in one rename, on error
    it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; the result follows the umask like open()
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
