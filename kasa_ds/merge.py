"""merge_kasa: fold every adapter into its base weight and return plain layers (W_world + ΔW)."""

from __future__ import annotations

from torch import nn

from .inject import CONFIG_ATTR
from .layer import kasa_layers


def merge_kasa(model: nn.Module) -> nn.Module:
    """Replace each KaSALinear by its base layer with weight W_world + ΔW, in place; returns ``model``.

    A 4-bit (QKaSA) base becomes an nn.Linear in its compute dtype holding dequantized W_eff + ΔW.

    The result is an ordinary transformers/torch model: ``save_pretrained`` writes a checkpoint that plain
    transformers loads. All parameters are left frozen except modules_to_save, as they were.
    """
    for name, layer in list(kasa_layers(model)):
        model.set_submodule(name, layer.merged_module())
    if hasattr(model, CONFIG_ATTR):
        delattr(model, CONFIG_ATTR)
    return model
