"""Owner scheduling: which rank solves which weight, and in which round (so no rank gathers too much at once).

Every rank computes the same schedule from the same list, so no communication is needed to agree on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

DEFAULT_MAX_GATHER_BYTES = 2 << 30


@dataclass
class WorkItem:
    """One piece of truncation work: its name, the shape (m, n) of each of its ``count`` weights (a range of
    experts is several) and the bytes its owner gathers."""

    name: str
    shape: tuple[int, int]
    nbytes: int
    count: int = 1

    @property
    def cost(self) -> float:
        return svd_cost(self.shape) * self.count


@dataclass
class Assignment:
    index: int  # into the list given to assign_owners()
    owner: int
    round: int


def svd_cost(shape: tuple[int, int]) -> float:
    """Relative cost of one tail solve: the Gram (m·n·k) plus its eigh (~k³), k = min(m, n)."""
    m, n = shape
    k = min(m, n)
    return m * n * k + 4.0 * k ** 3


def assign_owners(items: list[WorkItem], world: int,
                  max_gather_bytes: int = DEFAULT_MAX_GATHER_BYTES) -> list[Assignment]:
    """Owner and round of every item, in the items' order; deterministic, identical on all ranks.

    Longest-processing-time-first: the costliest weight goes to the least loaded rank. A new round starts when a
    weight would push its owner's gathered bytes in the current round past ``max_gather_bytes`` (a weight larger than
    the cap gets a round of its own on its owner).
    """
    order = sorted(range(len(items)), key=lambda i: (-items[i].cost, i))
    load = [0.0] * world
    round_bytes = [0] * world
    current = 0
    out: list[Optional[Assignment]] = [None] * len(items)
    for i in order:
        item = items[i]
        owner = min(range(world), key=lambda r: (load[r], r))
        if round_bytes[owner] and round_bytes[owner] + item.nbytes > max_gather_bytes:
            current += 1
            round_bytes = [0] * world
        round_bytes[owner] += item.nbytes
        load[owner] += item.cost
        out[i] = Assignment(i, owner, current)
    return [a for a in out if a is not None]
