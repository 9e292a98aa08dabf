"""One training per output directory: rank 0 holds an exclusive lock on <output_dir>/.kasa_ds.lock for the run.

The lock is an OS file lock (``flock``): a crashed or killed run releases it with its process, so no stale lock is
ever left. A second training on the same directory is refused before anything loads, naming the holder.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path
from typing import Optional, TextIO

from .config import ConfigError

LOCK_FILE = ".kasa_ds.lock"


class RunLock:
    def __init__(self, output_dir: str | os.PathLike) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.file: Optional[TextIO] = None

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming the training that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise ConfigError(f"output_dir {self.path.parent} is in use by another training ({holder}); wait for it "
                              "to end, stop it, or choose another output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self.file = handle

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
