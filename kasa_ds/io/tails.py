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
from ..core import fingerprint
from ..core.truncation import tail_factors
from ..formats.bnb4 import quantize_roundtrip
from ..formats.bnb8 import quantize_roundtrip8
from .adapter import PREFIX, check_same_base
from .svd_cache import SVDCache


def roundtrip_of(quantization: Optional[dict]) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """W ↦ D(Q(W)) as the base was quantized (kasa_ds_config.json's base_quantization); None for a float base."""
    if quantization is None:
        return None
    if quantization["quant_type"] == "int8":
        return quantize_roundtrip8
    return partial(quantize_roundtrip, quant_type=quantization["quant_type"],
                   double_quant=quantization["double_quant"])


def observed_entry(weight: torch.Tensor, x: torch.Tensor, quantization: Optional[dict]) -> dict:
    """The fingerprint entry (kasa_ds.core.fingerprint) of a checkpoint weight: X sampled, labelled with the dtype
    the checkpoint stores W in, or the quantization the adapter's base used."""
    label = quantization["quant_type"] if quantization is not None else weight.dtype
    return fingerprint.record(x.flatten()[fingerprint.sample_positions(tuple(x.shape))], label)


def check_adapter_shape(name: str, weight: torch.Tensor, state: dict[str, torch.Tensor], base) -> None:
    """The adapter's factors of module ``name`` (PEFT-keyed ``state``) fit the base weight (m×n): lora_B m rows,
    lora_A n columns; else one ValueError naming both shapes."""
    a, b = state[f"{PREFIX}{name}.lora_A.weight"], state[f"{PREFIX}{name}.lora_B.weight"]
    if (b.shape[0], a.shape[1]) != tuple(weight.shape):
        raise ValueError(f"{base}: {name} is {tuple(weight.shape)} but the adapter was trained on a "
                         f"{(b.shape[0], a.shape[1])} weight: this is another model's checkpoint; pass the base the "
                         "adapter was trained on")


class BaseCheck:
    """Checks, weight by weight as a tool reads them, that a checkpoint is the base an adapter was trained on
    (its kasa_ds_config.json's base_fingerprint); the first weight that differs ends the tool with both bases named."""

    def __init__(self, recorded: Optional[dict], where, this_base: str, allow_other_base: bool = False,
                 fix: str = "--allow-other-base") -> None:
        self.recorded, self.where, self.this_base, self.fix = recorded, where, this_base, fix
        self.active = bool(recorded) and not allow_other_base
        self.seen: dict[str, dict] = {}

    def __call__(self, name: str, weight: torch.Tensor, x: torch.Tensor, quantization: Optional[dict]) -> None:
        """``name``: the adapter's module name; ``weight`` as stored, ``x`` what training truncated."""
        if not self.active or name not in self.recorded["layers"]:
            return
        self.seen[name] = observed_entry(weight, x, quantization)
        if fingerprint.mismatch(self.recorded["layers"][name], self.seen[name]) is not None:
            check_same_base(self.recorded, self.seen, self.where, self.this_base, fix=self.fix)


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
    tail = tail_factors(x, config.r, config.svd_solver, name=f"{name}.weight")
    return x, tail.left.float(), tail.right.float()
