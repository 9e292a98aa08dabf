"""The regularizer's math on one adapter: r×r Grams, ‖G − I‖_F, and the autograd terms computed inside forward.

    lora_A = ΔVᵀ (r×n): G = A Aᵀ  (``rows=True``)        lora_B = ΔU (m×r): G = BᵀB  (``rows=False``)

Everything here is r×r work on a factor; nothing knows layers, models or how parameters are placed.
"""

from __future__ import annotations

import torch


def gram(weight: torch.Tensor, rows: bool) -> torch.Tensor:
    """W Wᵀ (rows) or Wᵀ W, r×r, float32, differentiable."""
    w = weight.float()
    return w @ w.T if rows else w.T @ w


def orthogonality(grams: torch.Tensor) -> torch.Tensor:
    """‖G − I_r‖_F of an r×r Gram, or per Gram of an (L, r, r) stack."""
    eye = torch.eye(grams.shape[-1], device=grams.device)
    return torch.linalg.matrix_norm(grams - eye)


class OrthogonalityPenalty(torch.autograd.Function):
    """‖G − I_r‖_F of one factor with its gradient computed in forward.

    With E = G − I (r×r, symmetric): ∂‖E‖_F/∂W = 2·E·W / ‖E‖_F (rows) or 2·W·E / ‖E‖_F (cols); 0 where ‖E‖ = 0.
    Only the gradient is saved, never W: a partitioned placement (ZeRO-3) releases W after its module's forward.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: bool):
        w = weight.float()
        e = gram(w, rows) - torch.eye(w.shape[0] if rows else w.shape[1], device=w.device)
        norm = torch.linalg.norm(e)
        grad = (2 * (e @ w if rows else w @ e) / norm) if norm > 0 else torch.zeros_like(w)
        ctx.save_for_backward(grad.to(weight.dtype))
        return norm

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return g * grad, None


class SquaredNorm(torch.autograd.Function):
    """‖d‖² with its gradient 2d saved in forward (not d itself)."""

    @staticmethod
    def forward(ctx, d: torch.Tensor):
        ctx.save_for_backward(2 * d.detach())
        return d.float().square().sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return g * grad
