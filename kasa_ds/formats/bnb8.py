"""bitsandbytes 8-bit bases (LLM.int8 ``Linear8bitLt``, frozen int8 weight with per-row scales).

The weight is stored as int8 CB (m×n) and float32 row scales SCB (m): W ≈ CB · SCB / 127. Truncation reads that
dequantized weight; ``quant_mode`` picks a low-rank correction (base untouched) or requantizing W_world to int8.
bitsandbytes moves CB/SCB from the parameter into ``module.state`` at the first forward; both places are read.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import QuantizedFormat


class Bnb8Format(QuantizedFormat):
    """A bitsandbytes Linear8bitLt base; merging builds a float nn.Linear in its bias's dtype (else float32)."""

    name = "bnb8"

    def matches(self, module: nn.Module) -> bool:
        return type(module).__name__ == "Linear8bitLt"

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return dequantize8(module)

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        """int8 with new row scales (from the float16 copy bitsandbytes quantizes)."""
        from bitsandbytes.nn import Int8Params

        device = module.weight.device
        module.weight = Int8Params(weight.float().cpu(), requires_grad=False, has_fp16_weights=False).to(device)
        module.state.CB = module.state.SCB = None  # the next forward takes the new CB/SCB from the parameter

    def merged_dtype(self, module: nn.Module) -> torch.dtype:
        return module.bias.dtype if module.bias is not None else torch.float32

    def metadata(self, module: nn.Module, model: nn.Module) -> Optional[dict]:
        dtype = getattr(getattr(model, "config", None), "dtype", None) or torch.float32
        return {"quant_type": "int8", "threshold": float(module.state.threshold),
                "from_dtype": str(dtype).removeprefix("torch.")}


BNB8 = Bnb8Format()


def dequantize8(module: nn.Module) -> torch.Tensor:
    """The (m×n) float32 weight an 8-bit layer computes with: CB · SCB / 127."""
    import bitsandbytes.functional as bnbF

    scales = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
    return bnbF.int8_vectorwise_dequant(module.weight.data, scales).float()


def quantize_linear8(linear: nn.Linear) -> nn.Module:
    """An 8-bit (LLM.int8, threshold 0: no fp16 outlier columns) copy of ``linear`` on its device."""
    from bitsandbytes.nn import Int8Params, Linear8bitLt

    q = Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None, has_fp16_weights=False,
                     threshold=0.0, device="meta")
    q.weight = Int8Params(linear.weight.detach().float().cpu(), requires_grad=False, has_fp16_weights=False)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone().cpu(), requires_grad=False)
    return q.to(linear.weight.device)


def quantize_roundtrip8(weight: torch.Tensor) -> torch.Tensor:
    """D(Q(weight)) in float32, bit for bit what :func:`quantize_linear8` then :func:`dequantize8` give (m×n)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight.detach(), requires_grad=False)
    return dequantize8(quantize_linear8(linear))
