"""The dropped tail of a checkpoint's weight as training truncated it, recomputed from the original checkpoint.

An adapter stores ΔU, ΔΣ, ΔV but not the truncation; tools that work from files (the streamed merge, the LoRA export)
recompute it per weight exactly as training did: on the 16-bit weight, or for a quantized base (the adapter's
``base_quantization``) on D(Q(W)), the weight the quantized layer computed with; or read it from an SVD cache.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch

from ..config import KaSAConfig
from ..core.truncation import tail_factors
from ..formats.bnb4 import quantize_roundtrip
from ..formats.bnb8 import quantize_roundtrip8
from .svd_cache import SVDCache


def roundtrip_of(quantization: Optional[dict]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """W ↦ D(Q(W)) as the base was quantized (kasa_ds_config.json's base_quantization); None for a float base."""
    if quantization is None:
        return None
    if quantization["quant_type"] == "int8":
        return quantize_roundtrip8
    return partial(quantize_roundtrip, quant_type=quantization["quant_type"],
                   double_quant=quantization["double_quant"])


def base_and_tail(weight: torch.Tensor, name: str, config: KaSAConfig, quantization: Optional[dict] = None,
                  cache: Optional[SVDCache] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(X, L, R) for one checkpoint weight W (m×n): X the float32 weight training truncated (W, or D(Q(W)) for a
    quantized base), L (m×r) and R (r×n) its dropped tail, X_world = X − L·R. ``name``: the checkpoint's module name
    (the cache key)."""
    roundtrip = roundtrip_of(quantization)
    if roundtrip is not None:
        x = roundtrip(weight.to(getattr(torch, quantization["from_dtype"])))
    else:
        x = weight.float()
    if cache is not None and roundtrip is None:
        left, right = cache.factors(name)
        return x, left.float(), right.float()
    tail = tail_factors(x, config.r, config.svd_solver)
    return x, tail.left.float(), tail.right.float()
