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


def _scaled_residual(w: torch.Tensor, rows: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For factors w (..., r, n) (rows) or (..., m, r): (‖E‖_F, 2E/‖E‖_F) with E = G − I_r, in float32 (float64
    stays float64); 0 where ‖E‖ = 0."""
    w = w.to(torch.promote_types(w.dtype, torch.float32))
    e = (w @ w.mT if rows else w.mT @ w) - torch.eye(w.shape[-2 if rows else -1], device=w.device)
    norm = torch.linalg.matrix_norm(e)
    return norm, e * torch.where(norm > 0, 2 / norm, torch.zeros_like(norm))[..., None, None]


def _residual_grad(scaled: torch.Tensor, w: torch.Tensor, rows: bool) -> torch.Tensor:
    """∂‖E‖_F/∂W = 2·E·W / ‖E‖_F (rows) or 2·W·E / ‖E‖_F (cols), from ``scaled`` = 2E/‖E‖_F; float32."""
    w = w.to(scaled.dtype)
    return scaled @ w if rows else w @ scaled


class OrthogonalityPenalty(torch.autograd.Function):
    """‖G − I_r‖_F of one factor, or of each factor of a stack (E, r, n) / (E, m, r) → (E,), with its gradient
    computed in forward.

    Only the gradient is saved, never W: a partitioned placement (ZeRO-3) releases W after its module's forward.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: bool):
        norm, scaled = _scaled_residual(weight, rows)
        ctx.save_for_backward(_residual_grad(scaled, weight, rows).to(weight.dtype))
        return norm

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return g[..., None, None] * grad, None


class StackedOrthogonality(torch.autograd.Function):
    """‖G_l − I_r‖_F for L factors of one r and any shapes (all on one device) → (L,), float32.

    ``StackedOrthogonality.apply(rows, *weights)``. Factors of one shape go through one batched product each way,
    so the cost is a few operations per shape instead of per layer (per-layer Grams made the regularizer ~2 % of a
    small model's step). Saves the factors themselves (references, no copy) and each 2E/‖E‖ (r×r); the stacks are
    rebuilt in backward.
    """

    @staticmethod
    def forward(ctx, rows: bool, *weights: torch.Tensor):
        by_shape: dict[tuple, list[int]] = {}
        for i, w in enumerate(weights):
            by_shape.setdefault((tuple(w.shape), w.dtype), []).append(i)
        groups = list(by_shape.values())
        norms, scaled = zip(*(_scaled_residual(torch.stack([weights[i] for i in index]), rows) for index in groups))
        order = torch.tensor([i for index in groups for i in index], device=norms[0].device)
        ctx.rows, ctx.groups = rows, groups
        ctx.save_for_backward(*scaled, *weights)
        norms = torch.cat(norms)
        return torch.empty_like(norms).index_copy_(0, order, norms)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        saved = ctx.saved_tensors
        scaled, weights = saved[:len(ctx.groups)], saved[len(ctx.groups):]
        grads: list = [None] * len(weights)
        for index, sc in zip(ctx.groups, scaled):
            if not any(ctx.needs_input_grad[1 + i] for i in index):
                continue
            gi = g[torch.tensor(index, device=g.device)]
            grad = _residual_grad(sc * gi[:, None, None], torch.stack([weights[i] for i in index]), ctx.rows)
            dtype = weights[index[0]].dtype
            for i, gw in zip(index, grad.to(dtype).unbind(0)):
                grads[i] = gw
        return (None, *grads)


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
