"""Which adapter each compared method puts on a model: kasa_ds KaSA and its ablations, PEFT LoRA, PiSSA, DoRA, and the MiLoRA-style init (PEFT has none)."""

from __future__ import annotations

import math
import re

import torch

from ..config import KaSAConfig
from ..core.regularization import kasa_regularization
from ..inject import apply_kasa
from ..training.models import load_model

CLASSIFICATION_METHODS = ("kasa", "lora", "pissa", "milora", "full", "kasa_no_trunc", "kasa_no_reg", "kasa_r4", "kasa_r16")


def build_classifier(method: str, cfg, r: int, seed: int, pad_token_id: int):
    """The model for ``method`` on CPU, its trainable parameters and regularizer (a callable or None)."""
    model = load_model(cfg.model, pad_token_id)
    k = cfg.kasa
    torch.manual_seed(seed)
    if method == "full":
        return model, list(model.parameters()), None
    if method.startswith("kasa"):
        rank = {"kasa_r4": 4, "kasa_r16": 16}.get(method, r)
        no_reg = method == "kasa_no_reg"
        config = KaSAConfig(r=rank, alpha=2 * rank, dropout=k.dropout, target_modules=k.target_modules,
                            beta=0.0 if no_reg else k.beta, gamma=0.0 if no_reg else k.gamma,
                            modules_to_save=k.modules_to_save, exclude_modules=k.exclude_modules, init_seed=seed)
        keep_whole = (lambda targets, config: []) if method == "kasa_no_trunc" else None
        apply_kasa(model, config, truncate=keep_whole, show_progress=False)
        return model, [p for p in model.parameters() if p.requires_grad], (None if no_reg else kasa_regularization)
    from peft import LoraConfig, get_peft_model

    targets = peft_target_regex(model, cfg)
    init = {"lora": True, "pissa": "pissa", "milora": True}[method]
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=k.dropout, target_modules=targets,
                                             modules_to_save=list(k.modules_to_save), init_lora_weights=init))
    if method == "milora":
        milora_init_(model)
    return model, [p for p in model.parameters() if p.requires_grad], None


def peft_target_regex(model, cfg) -> str:
    """One regex naming exactly the modules kasa_ds adapts (so PEFT adapts the same set)."""
    config = cfg.kasa_config()
    names = [n for n, m in model.named_modules() if n and config.is_target(n) and isinstance(m, torch.nn.Linear)]
    return "|".join(re.escape(n) for n in names)


@torch.no_grad()
def milora_init_(model) -> None:
    """MiLoRA (Wang et al. 2024): B A starts as the r minor singular components, which leave the frozen base."""
    from peft.tuners.lora import Linear as LoraLinear

    for module in model.modules():
        if isinstance(module, LoraLinear):
            w = module.base_layer.weight
            scale = module.scaling["default"]
            u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
            r = module.r["default"]
            root = s[-r:].sqrt() / math.sqrt(scale)
            module.lora_B["default"].weight.copy_((u[:, -r:] * root).to(w.dtype))
            module.lora_A["default"].weight.copy_((root[:, None] * vh[-r:]).to(w.dtype))
            w.sub_((u[:, -r:] * s[-r:]) @ vh[-r:])


METHODS = ("kasa", "lora", "pissa", "dora", "milora")


TARGETS = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")


def adapt(method: str, model, r: int, seed: int):
    """Adapter ``method`` on the targets of every (remaining) decoder layer; returns (trainable params, regularizer)."""
    torch.manual_seed(seed)
    model.requires_grad_(False)
    if method == "kasa":
        apply_kasa(model, KaSAConfig(r=r, alpha=2 * r, target_modules=TARGETS, init_seed=seed), show_progress=False)
        return [p for p in model.parameters() if p.requires_grad], kasa_regularization
    from peft import LoraConfig, get_peft_model

    init = {"lora": True, "dora": True, "pissa": "pissa", "milora": True}[method]
    wrapped = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(TARGETS),
                                               init_lora_weights=init, use_dora=method == "dora"))
    if method == "milora":
        milora_init_(wrapped)
    return [p for p in wrapped.parameters() if p.requires_grad], None  # PEFT adapts ``model``'s modules in place

