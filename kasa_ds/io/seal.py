"""Which checkpoints this user's runs wrote: an HMAC-SHA256 over every file, keyed by a secret only this user reads.

DeepSpeed (and the transformers Trainer) save their state as Python pickles, and loading a pickle runs whatever code
it names: a checkpoint directory someone else wrote (downloaded, shared, planted) must not be loaded unless the user
says they trust it. kasa_ds seals each checkpoint it writes — {relative path: HMAC of the path and the file's bytes}
— with a 32-byte key created on first use in ``$KASA_DS_CACHE/checkpoint-seal.key`` (default ``~/.cache/kasa_ds``;
mode 0600), and resumes a checkpoint holding pickles only when every file is listed and matches. A forger would need
the key; a copied checkpoint of your own still verifies (same user, same key: on a cluster, the shared home).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path
from typing import Optional

#: files whose loading can execute code (torch.save / pickle); safetensors and JSON cannot
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle")


def key_file() -> Path:
    return Path(os.environ.get("KASA_DS_CACHE", Path.home() / ".cache" / "kasa_ds")) / "checkpoint-seal.key"


def seal_key() -> bytes:
    """This user's sealing key, created (0600, atomically) the first time it is needed."""
    path = key_file()
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        try:
            os.link(tmp, path)  # the first writer wins; a concurrent one reads the winner's key
        except FileExistsError:
            pass
        tmp.unlink()
    return path.read_bytes()


def _mac(key: bytes, root: Path, relative: str) -> str:
    mac = hmac.new(key, relative.encode(), hashlib.sha256)
    with open(root / relative, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            mac.update(block)
    return mac.hexdigest()


def files_of(directory: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name not in exclude)


def seal(directory: str | os.PathLike, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """{relative path: HMAC} of every file under ``directory`` but ``exclude`` (names)."""
    directory, key = Path(directory), seal_key()
    return {rel: _mac(key, directory, rel) for rel in files_of(directory, exclude)}


def holds_pickles(directory: str | os.PathLike) -> bool:
    return Path(directory).is_dir() and any(p.suffix in PICKLE_SUFFIXES for p in Path(directory).rglob("*") if p.is_file())


def unsealed_reason(directory: str | os.PathLike, sealed: Optional[dict[str, str]],
                    exclude: tuple[str, ...] = ()) -> Optional[str]:
    """None when ``sealed`` (as written by :func:`seal`) matches every file under ``directory``; else why not."""
    directory = Path(directory)
    if not sealed:
        return "it carries no kasa_ds seal"
    key = seal_key()
    extra = [f for f in files_of(directory, exclude) if f not in sealed]
    if extra:
        return f"{extra[0]} was added after it was sealed"
    for rel, mac in sealed.items():
        if not (directory / rel).is_file():
            return f"{rel} is missing"
        if not hmac.compare_digest(_mac(key, directory, rel), mac):
            return f"{rel} does not match its seal (changed, or sealed by another user's key)"
    return None


def refusal(directory: str | os.PathLike, reason: str, option: str) -> str:
    """The one-line message for a checkpoint that will not be loaded."""
    return (f"{directory}: not resuming from it: {reason}. Its state is stored as Python pickles, and loading a "
            f"pickle runs whatever code it holds; kasa_ds loads only checkpoints its runs sealed with this user's key "
            f"({key_file()}). If you trust where this checkpoint comes from, set {option}")
