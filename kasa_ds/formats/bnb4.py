"""bitsandbytes 4-bit bases (NF4/FP4, optional double quantization): QKaSA.

The truncation runs in float32 on the dequantized weight (tools/qkasa_modes.py also measures truncating the original
16-bit weights), then one of two modes applies it (``KaSAConfig.quant_mode``):

    requantize           W_world is quantized back to 4 bits and replaces the base (one 4-bit base per task);
    low_rank_correction  the 4-bit base is left untouched and the layer subtracts the frozen rank-r tail as two small
                         factors in its forward, y = Q(W)x − L(Rx) + ΔW x (one quantized base can serve many tasks;
                         the effective base has exactly the tail of the dequantized weight removed).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..core.layer import KaSALinear
from .base import QuantizedFormat


class Bnb4Format(QuantizedFormat):
    """A bitsandbytes Linear4bit base; merging builds a float nn.Linear in its compute dtype."""

    name = "bnb4"

    def matches(self, module: nn.Module) -> bool:
        return is_4bit(module)

    def dequantize(self, module: nn.Module) -> torch.Tensor:
        return dequantize(module)

    def read(self, module: nn.Module, stored: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The float32 weight; ``stored``: the packed bytes a ZeRO-3 placement gathered (the quantization state is
        held by every rank, on the parameter)."""
        if stored is None:
            return dequantize(module)
        import bitsandbytes.functional as bnbF

        return bnbF.dequantize_4bit(stored, module.weight.quant_state).float()

    def requantize(self, module: nn.Module, weight: torch.Tensor) -> None:
        requantize_(module, weight)

    def merged_dtype(self, module: nn.Module) -> torch.dtype:
        return module.compute_dtype or torch.float32

    def metadata(self, module: nn.Module, model: nn.Module) -> Optional[dict]:
        """How the base was quantized: what tools/merge.py needs to rebuild it from the 16-bit checkpoint."""
        w = module.weight
        dtype = getattr(getattr(model, "config", None), "dtype", None) or torch.float32
        return {"quant_type": w.quant_type, "double_quant": bool(w.compress_statistics), "blocksize": w.blocksize,
                "from_dtype": str(dtype).removeprefix("torch.")}


BNB4 = Bnb4Format()


def is_4bit(module: nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4")


def training_layout_(module: nn.Module) -> None:
    """Keep a 4-bit layer in bitsandbytes' canonical layout: on CPU it otherwise repacks its weight for inference at
    the first eval-mode forward, after which training, dequantizing and merging fail. Undoes such a repack."""
    if hasattr(module, "support_avx512bf16_for_cpu"):
        module.support_avx512bf16_for_cpu = False
    state = getattr(module.weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        from bitsandbytes.nn.modules import _convert_weight_packed_for_cpu_inverse

        data, quant_state = _convert_weight_packed_for_cpu_inverse(module.weight.data, state)
        module.weight.data, module.weight.quant_state = data, quant_state


def dequantize(module: nn.Module) -> torch.Tensor:
    """The (m×n) float32 weight a 4-bit layer computes with."""
    import bitsandbytes.functional as bnbF

    training_layout_(module)
    w = module.weight
    return bnbF.dequantize_4bit(w.data, w.quant_state).float()


def requantize_(module: nn.Module, weight: torch.Tensor) -> None:
    """Rewrite a 4-bit layer's weight as ``weight`` (m×n) quantized with the layer's own settings, in place: the
    same parameter object keeps its packed shape and storage dtype (a ZeRO-3 placement re-partitions it)."""
    from bitsandbytes.nn import Params4bit

    old = module.weight
    state = old.quant_state
    new = Params4bit(weight.to(torch.float32).contiguous().cpu(), requires_grad=False, quant_type=state.quant_type,
                     blocksize=state.blocksize, compress_statistics=state.nested,
                     quant_storage=old.quant_storage).to(old.device)
    old.data.copy_(new.data.view_as(old.data))
    old.quant_state = new.quant_state


HEADS = ("lm_head", "score", "classifier")


def quantized(name: str, module: nn.Module, keep: Callable[[str], bool]) -> bool:
    """Whether ``quantize_linears_`` turns this module 4-bit: every nn.Linear but heads and ``keep(name)``."""
    return type(module) is nn.Linear and name.rsplit(".", 1)[-1] not in HEADS and not keep(name)


def linear_4bit(linear: nn.Module, weight: torch.Tensor, quant_type: str, double_quant: bool,
                compute_dtype: torch.dtype, quant_storage: torch.dtype = torch.uint8) -> nn.Module:
    """A Linear4bit holding ``weight`` (m×n) of ``linear`` (an nn.Linear, possibly on the meta device) quantized,
    on the weight's device; the packed bytes are stored as ``quant_storage`` elements (uint8; or the compute dtype,
    which ZeRO-3 partitions like any weight: the same bytes reinterpreted). Bias: taken from ``linear`` (set it
    after when it is on the meta device)."""
    from bitsandbytes.nn import Linear4bit, Params4bit

    q = Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None, compute_dtype=compute_dtype,
                   compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage,
                   device="meta")
    q.weight = Params4bit(weight.detach().float().cpu(), requires_grad=False, quant_type=quant_type,
                          compress_statistics=double_quant, quant_storage=quant_storage).to(weight.device)
    if linear.bias is not None and linear.bias.device.type != "meta":
        q.bias = nn.Parameter(linear.bias.detach().clone().to(weight.device), requires_grad=False)
    training_layout_(q)
    return q


def quantize_linears_(model: nn.Module, quant_type: str = "nf4", double_quant: bool = True,
                      compute_dtype: torch.dtype = torch.float32,
                      keep: Callable[[str], bool] = lambda name: False) -> int:
    """Replace every nn.Linear by a bitsandbytes Linear4bit holding its weight, in place, except heads and the
    modules ``keep(name)`` is true for (e.g. those trained in full, modules_to_save).

    What ``from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))`` does on a GPU, done on
    the loaded model so it also runs on a CPU-only machine. Returns the number of layers quantized.
    """
    count = 0
    for name, module in list(model.named_modules()):
        if quantized(name, module, keep):
            model.set_submodule(name, linear_4bit(module, module.weight, quant_type, double_quant, compute_dtype))
            count += 1
    return count


def quantize_roundtrip(weight: torch.Tensor, quant_type: str = "nf4", double_quant: bool = True) -> torch.Tensor:
    """D(Q(weight)) in float32, bit for bit what quantize_linears_ then dequantize give for this weight (m×n)."""
    holder = nn.Module()
    holder.layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    holder.layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantize_linears_(holder, quant_type, double_quant)
    return dequantize(holder.layer)


def effective_weight(layer: KaSALinear) -> torch.Tensor:
    """The m×n float32 base weight a KaSALinear around a 4-bit layer computes with (before ΔW)."""
    w = dequantize(layer.base_layer)
    if layer.tail_left is not None:
        w = w - layer.tail_left.float() @ layer.tail_right.float()
    return w
