"""What every command line (launch/, tools/) does with bad input: one ``error:`` line naming the fix, exit code 2."""

from __future__ import annotations

import argparse
import math
import sys
from contextlib import contextmanager
from typing import Iterator, NoReturn

EXIT_BAD_INPUT = 2


class CommandError(SystemExit):
    """Ends a command with exit code 2; ``str()`` is the ``error:`` line that was printed."""

    def __init__(self, message: str) -> None:
        super().__init__(EXIT_BAD_INPUT)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and end the command with exit code 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise CommandError(str(message))


@contextmanager
def bad_input_fails(*kinds: type[BaseException]) -> Iterator[None]:
    """Turn the given exception kinds (default: ValueError, FileNotFoundError) raised inside into :func:`fail`."""
    try:
        yield
    except (kinds or (ValueError, FileNotFoundError)) as e:
        fail(str(e))


# ---- argparse types: a bad number is argparse's one-line usage error (exit 2) ------------------------------------

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be an integer >= 1")
    return value


def positive_float(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text}: must be a finite number > 0")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text}: must be in [0, 1)")
    return value
