"""Which base an adapter belongs to: a few sampled values of every adapted weight, recorded before truncation.

A KaSA adapter is meaningful only on the truncated base it was trained on: on another base of the same shapes
(another seed, a fine-tuned variant, a 1 %-perturbed copy) it loads without error and computes garbage. So every
adapter, checkpoint and export records, per adapted weight W (m×n), ``SAMPLES`` values of W at positions fixed by
the shape, and the dtype it was held in; every loader, exporter, merger and resume compares them with the base it is
given. Positions are the same for every run and rank; 16 float32 values per weight: 64 bytes (35 KiB for the 560
matrices of a 70B model).

Comparison: the same dtype must give the same values (up to 1e-6 relative, last-bit differences of a dequantization
on another device); different dtypes (a float32 checkpoint trained as bfloat16, say) are compared to the coarser
one's precision (its eps, twice the rounding error). A base that differs in all weights by 1 % of their values fails
every layer (for a bfloat16 base, each sample passes with probability ≈ 0.56, sixteen of them ≈ 1e-4).
"""

from __future__ import annotations

import hashlib
from typing import Optional

import torch

SAMPLES = 16
#: tolerance for a quantized format compared with itself (dequantized values on another device)
SAME_DTYPE_RTOL = 1e-6


def sample_positions(shape: tuple[int, int]) -> torch.Tensor:
    """``SAMPLES`` flat indices into an m×n weight, fixed by its shape (the same on every rank and in every run)."""
    m, n = shape
    generator = torch.Generator().manual_seed(1_000_003 * m + n)
    return torch.randint(0, m * n, (SAMPLES,), generator=generator)


def dtype_name(dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``; a format's own name (``"nf4"``) is kept as given."""
    return str(dtype).removeprefix("torch.")


def record(values: torch.Tensor, dtype) -> dict:
    """One weight's entry: its dtype and the sampled values (float32, exactly representable in JSON)."""
    return {"dtype": dtype_name(dtype), "values": [float(v) for v in values.float().cpu()]}


def digest(layers: dict[str, dict]) -> str:
    """A short name for a base in messages: 12 hex digits over the sampled values rounded to bfloat16 (equal for the
    same base held in float32 or bfloat16)."""
    h = hashlib.sha256()
    for name in sorted(layers):
        h.update(name.encode())
        h.update(torch.tensor(layers[name]["values"]).to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:12]


def _eps(dtype: str) -> float:
    try:
        return torch.finfo(getattr(torch, dtype)).eps
    except (AttributeError, TypeError):
        return 2.0 ** -3  # a 4-bit code (nf4/fp4) seen against its 16-bit source: never compared in practice


def mismatch(recorded: dict, observed: dict) -> Optional[float]:
    """None when one weight's observed entry agrees with its recorded one, else the largest relative difference."""
    a, b = torch.tensor(recorded["values"]), torch.tensor(observed["values"])
    if a.shape != b.shape:
        return float("inf")
    rtol = SAME_DTYPE_RTOL if recorded["dtype"] == observed["dtype"] else \
        max(_eps(recorded["dtype"]), _eps(observed["dtype"]))
    scale = torch.maximum(a.abs(), b.abs()).clamp_min(1e-30)
    diff = ((a - b).abs() / scale).max().item()
    return None if diff <= rtol or bool(torch.equal(a, b)) else diff


def compare(recorded: dict[str, dict], observed: dict[str, dict]) -> dict[str, float]:
    """{weight: largest relative difference} for every weight present in both whose samples disagree."""
    out = {}
    for name in sorted(set(recorded) & set(observed)):
        diff = mismatch(recorded[name], observed[name])
        if diff is not None:
            out[name] = diff
    return out
