"""merge_kasa: fold every adapter into its base weight and return plain layers (W_world + ΔW)."""

from __future__ import annotations

from torch import nn

from .core.experts import expert_layers
from .core.layer import kasa_layers
from .inject import CONFIG_ATTR, FINGERPRINT_ATTR
from .registry import format_of


def merge_kasa(model: nn.Module) -> nn.Module:
    """Replace each KaSA layer by a plain layer computing W_world + ΔW, in place; returns ``model``.

    Each base's format builds it: a float base (fused experts too) absorbs ΔW in place; a 4-bit (QKaSA) base becomes an nn.Linear in its
    compute dtype holding dequantized W_eff + ΔW. The result is an ordinary transformers/torch model:
    ``save_pretrained`` writes a checkpoint that plain transformers loads. All parameters stay frozen except
    modules_to_save, as they were.
    """
    for name, layer in list(kasa_layers(model)):
        model.set_submodule(name, format_of(layer.base_layer).merged_linear(layer))
    for name, experts in list(expert_layers(model)):  # fused experts: W_world + ΔW written into their parameters
        experts.merge()
        model.set_submodule(name, experts.base_layer)
    for attr in (CONFIG_ATTR, FINGERPRINT_ATTR):
        if hasattr(model, attr):
            delattr(model, attr)
    model.__dict__.pop("save_pretrained", None)  # the KaSA model's refusal (kasa_ds.inject): a plain model saves
    return model
