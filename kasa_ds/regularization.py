"""The KaSA regularizer  β·Σ_l ‖ΔΣ_l‖² + γ·Σ_l (‖ΔU_lᵀΔU_l − I_r‖_F + ‖ΔV_lᵀΔV_l − I_r‖_F).

Summed over adapted layers (PEFT's convention; the official script takes the mean, i.e. its β, γ are L times
ours). Each layer's r×r Grams are computed from its parameters directly (autograd keeps references, no copies:
stacking the factors first would save a copy of every adapter for backward), then stacked (r×r each) so the norms
and the sum are single batched operations.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .layer import KaSALinear, kasa_layers
from .tp_layer import KaSAParallelLinear


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
    """Per-layer (‖ΔΣ‖², orthogonality term, β, γ) as 1-D tensors, or None if no layer.

    Layers that compute their terms in forward (ZeRO-3) contribute the values of their last training forward,
    tensor-parallel layers their own terms (one r×r all-reduce each); the others are computed here, batched by shape.
    Under TP every rank of a TP group gets the same value, and that must be so: call it on every rank.
    """
    groups: dict[tuple, list[KaSALinear]] = defaultdict(list)
    l2s, orths, betas, gammas = [], [], [], []
    for _, layer in kasa_layers(model):
        if layer.regularize_in_forward or isinstance(layer, KaSAParallelLinear):
            # ZeRO-3: the terms of the last forward; TP: Grams all-reduced over the layer's TP group
            l2, orth = (layer.cached_regularization_terms() if layer.regularize_in_forward
                        else layer.regularization_terms())
            l2s.append(l2.reshape(1))
            orths.append(orth.reshape(1))
            betas.append(torch.tensor([layer.beta], device=l2.device))
            gammas.append(torch.tensor([layer.gamma], device=l2.device))
        else:
            groups[(layer.r, layer.lora_diag.device)].append(layer)
    if not groups and not l2s:
        return None
    for (r, device), layers in groups.items():
        gram_b = torch.stack([_gram(m.lora_B.weight, cols=True) for m in layers])   # (L, r, r): ΔUᵀΔU
        gram_a = torch.stack([_gram(m.lora_A.weight, cols=False) for m in layers])  # (L, r, r): ΔVᵀΔV
        d = torch.stack([m.lora_diag for m in layers]).float()                       # (L, r)
        eye = torch.eye(r, device=device)
        orths.append(torch.linalg.matrix_norm(gram_b - eye) + torch.linalg.matrix_norm(gram_a - eye))
        l2s.append(d.square().sum(-1))
        betas.append(torch.tensor([m.beta for m in layers], device=device))
        gammas.append(torch.tensor([m.gamma for m in layers], device=device))
    device = l2s[0].device
    return tuple(torch.cat([t.to(device) for t in ts]) for ts in (l2s, orths, betas, gammas))


def _gram(w: torch.Tensor, cols: bool) -> torch.Tensor:
    """wᵀw (cols) or wwᵀ, r×r, in float32."""
    w = w.float()
    return w.T @ w if cols else w @ w.T
