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
    """‖G − I_r‖_F of one factor, or of each factor of a stack (E, r, n) / (E, m, r) → (E,), with its gradient
    computed in forward.

    With E = G − I (r×r, symmetric): ∂‖E‖_F/∂W = 2·E·W / ‖E‖_F (rows) or 2·W·E / ‖E‖_F (cols); 0 where ‖E‖ = 0.
    Only the gradient is saved, never W: a partitioned placement (ZeRO-3) releases W after its module's forward.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: bool):
        w = weight.float()
        g = w @ w.mT if rows else w.mT @ w
        e = g - torch.eye(g.shape[-1], device=w.device)
        norm = torch.linalg.matrix_norm(e)
        scale = torch.where(norm > 0, 2 / norm, torch.zeros_like(norm))[..., None, None]
        ctx.save_for_backward(((e @ w if rows else w @ e) * scale).to(weight.dtype))
        return norm

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return g[..., None, None] * grad, None


class SquaredNorm(torch.autograd.Function):
    """‖d‖² of a vector, or of each row of a stack (E, r) → (E,), with its gradient 2d saved in forward (not d)."""

    @staticmethod
    def forward(ctx, d: torch.Tensor):
        ctx.save_for_backward(2 * d.detach())
        return d.float().square().sum(-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return g[..., None] * grad
