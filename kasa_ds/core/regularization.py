"""The KaSA regularizer  β·Σ_l ‖ΔΣ_l‖² + γ·Σ_l (‖ΔU_lᵀΔU_l − I_r‖_F + ‖ΔV_lᵀΔV_l − I_r‖_F).

Summed over adapted layers (PEFT's convention; the official script takes the mean, i.e. its β, γ are L times
ours). The factors of one shape are stacked and their r×r Grams and norms computed as batched products
(penalty.StackedOrthogonality, which saves references to the factors, not the stacks); the sum is one operation.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .experts import expert_layers
from .layer import KaSALinear, kasa_layers
from .penalty import StackedOrthogonality


def kasa_regularization(model: nn.Module, beta: float | None = None, gamma: float | None = None) -> torch.Tensor:
    """Differentiable scalar (float32). β, γ default to each layer's own (set from its KaSAConfig)."""
    terms = regularization_terms(model)
    if terms is None:
        return torch.zeros(())
    l2, orth, layer_beta, layer_gamma = terms
    b = layer_beta if beta is None else torch.full_like(layer_beta, beta)
    g = layer_gamma if gamma is None else torch.full_like(layer_gamma, gamma)
    return (b * l2).sum() + (g * orth).sum()


def regularization_terms(model: nn.Module):
    """Per-layer (‖ΔΣ‖², orthogonality term, β, γ) as 1-D tensors, or None if no layer; an experts module
    contributes one entry per expert and projection.

    Layers computing their terms in forward (partitioned adapters) contribute the values of their last training
    forward; layers whose Grams need a collective (``stackable_terms = False``: tensor parallel) their own terms —
    every rank of such a group must call this; the others are computed here, batched by rank.
    """
    groups: dict[tuple, list[KaSALinear]] = defaultdict(list)
    l2s, orths, betas, gammas = [], [], [], []
    for _, layer in kasa_layers(model):
        if layer.regularize_in_forward or not layer.stackable_terms:
            l2, orth = (layer.cached_regularization_terms() if layer.regularize_in_forward
                        else layer.regularization_terms())
            l2s.append(l2.reshape(1))
            orths.append(orth.reshape(1))
            betas.append(torch.tensor([layer.beta], device=l2.device))
            gammas.append(torch.tensor([layer.gamma], device=l2.device))
        else:
            groups[(layer.r, layer.lora_diag.device)].append(layer)
    for _, experts in expert_layers(model):  # per expert and projection, batched inside the module
        l2, orth = (experts.cached_regularization_terms() if experts.regularize_in_forward
                    else experts.regularization_terms())
        l2s.append(l2)
        orths.append(orth)
        betas.append(torch.full_like(l2, experts.beta))
        gammas.append(torch.full_like(l2, experts.gamma))
    if not groups and not l2s:
        return None
    for (r, device), layers in groups.items():
        d = torch.stack([m.lora_diag for m in layers]).float()  # (L, r)
        orths.append(StackedOrthogonality.apply(False, *(m.lora_B.weight for m in layers))    # ‖ΔUᵀΔU − I‖
                     + StackedOrthogonality.apply(True, *(m.lora_A.weight for m in layers)))  # ‖ΔVᵀΔV − I‖
        l2s.append(d.square().sum(-1))
        betas.append(torch.tensor([m.beta for m in layers], device=device))
        gammas.append(torch.tensor([m.gamma for m in layers], device=device))
    device = l2s[0].device
    return tuple(torch.cat([t.to(device) for t in ts]) for ts in (l2s, orths, betas, gammas))
