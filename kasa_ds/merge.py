"""merge_kasa: fold every adapter into its base weight and return plain layers (W_world + ΔW)."""

from __future__ import annotations

import torch
from torch import nn

from .inject import CONFIG_ATTR
from .layer import kasa_layers
from .quant import effective_weight, is_4bit


def merge_kasa(model: nn.Module) -> nn.Module:
    """Replace each KaSALinear by its base layer with weight W_world + ΔW, in place; returns ``model``.

    A 4-bit (QKaSA) base becomes an nn.Linear in its compute dtype holding dequantized W_eff + ΔW.

    The result is an ordinary transformers/torch model: ``save_pretrained`` writes a checkpoint that plain
    transformers loads. All parameters are left frozen except modules_to_save, as they were.
    """
    for name, layer in list(kasa_layers(model)):
        if is_4bit(layer.base_layer):  # QKaSA: dequantize, remove the tail, add ΔW into a 16-bit nn.Linear
            base = layer.base_layer
            dtype = base.compute_dtype or torch.float32
            linear = nn.Linear(layer.in_features, layer.out_features, bias=base.bias is not None, device="meta")
            linear.weight = nn.Parameter((effective_weight(layer) + layer.delta_weight()).to(dtype),
                                         requires_grad=False)
            if base.bias is not None:
                linear.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
            model.set_submodule(name, linear)
            continue
        layer.merge()
        model.set_submodule(name, layer.base_layer)
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
