"""KaSALinear: a frozen (truncated) base linear layer plus the trainable SVD-form update.

    y = base(x) + (α/r) · ΔU · diag(ΔΣ) · ΔVᵀ · dropout(x)

Parameter names follow PEFT's KaSA variant so state dicts map one to one:
    lora_A.weight  (r, n)  = ΔVᵀ   Kaiming-uniform at init
    lora_B.weight  (m, r)  = ΔU    zeros at init (so ΔW = 0)
    lora_diag      (r,)    = ΔΣ    N(0, 1) at init
    base_layer               the frozen base holding W_world (m×n)
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import nn

from .quant import effective_weight, is_4bit

class KaSALinear(nn.Module):
    """KaSA adapter around a base linear layer.

    Args:
        base_layer: the frozen layer computing x ↦ W_world x + b; its weight must already be truncated
            (see :func:`kasa_ds.inject.apply_kasa`).
        in_features, out_features: n and m of the (local) weight.
        r, alpha, dropout, beta, gamma: as in :class:`kasa_ds.KaSAConfig`.
        adapter_dtype: dtype of the adapter parameters.

    forward: (..., n) → (..., m), in the dtype the base layer returns.
    """

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float = 0.0, beta: float = 1e-4, gamma: float = 1e-3,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.beta, self.gamma = beta, gamma
        device = _device_of(base_layer)
        self.lora_A = AdapterFactor(in_features, r, rows=True, device=device, dtype=adapter_dtype)
        self.lora_B = AdapterFactor(r, out_features, rows=False, device=device, dtype=adapter_dtype)
        self.lora_diag = nn.Parameter(torch.empty(r, device=device, dtype=adapter_dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # QKaSA low_rank_correction: the frozen dropped tail of a 4-bit base, W_eff = Q(W) − tail_left·tail_right
        self.register_buffer("tail_left", None)  # (m, r)
        self.register_buffer("tail_right", None)  # (r, n)
        # ZeRO-3: a parameter is whole only inside its own module's forward, so each of ΔΣ, ΔVᵀ, ΔU computes its
        # regularizer term there (set_regularize_in_forward) and kasa_regularization sums the cached values.
        self.regularize_in_forward = False
        self.reg_cache: Optional[torch.Tensor] = None
        self.reset_adapter()

    def reset_adapter(self, generator: Optional[torch.Generator] = None) -> None:
        """PEFT's KaSA init: A Kaiming-uniform (a=√5), B = 0, ΔΣ ~ N(0, 1); ΔW = 0 whatever the generator."""
        with torch.no_grad():
            a = self.lora_A.weight
            bound = 1.0 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=√5) on a (r, n) weight
            a.copy_(torch.rand(a.shape, generator=generator, dtype=torch.float32).mul_(2 * bound).sub_(bound))
            self.lora_B.weight.zero_()
            self.lora_diag.copy_(torch.randn(self.r, generator=generator, dtype=torch.float32))

    def set_base_correction(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """Subtract the frozen rank-r ``left @ right`` from the base in forward (a 4-bit base kept untouched)."""
        self.tail_left, self.tail_right = left.detach().contiguous(), right.detach().contiguous()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.tail_left is not None:
            xt = x.to(self.tail_right.dtype)
            result = result - ((xt @ self.tail_right.T) @ self.tail_left.T).to(result.dtype)
        if self.merged:
            return result
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        diag = self.lora_diag
        if self.regularize_in_forward and self.training and torch.is_grad_enabled():
            self.reg_cache = _SquaredNorm.apply(diag)
            h = h + 0.0 * self.reg_cache  # exact; ties the term's backward to this layer's (gathered) backward
        update = self.lora_B(h * diag) * self.scaling
        return result + update.to(result.dtype)

    def set_regularize_in_forward(self, enabled: bool = True) -> None:
        self.regularize_in_forward = self.lora_A.regularize_in_forward = self.lora_B.regularize_in_forward = enabled

    def cached_regularization_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖ΔΣ‖², orthogonality) from the last training forward; each forward's terms are returned once."""
        terms = (self.reg_cache, self.lora_A.reg_cache, self.lora_B.reg_cache)
        if any(t is None for t in terms):
            raise RuntimeError("the KaSA regularizer is computed in the layers' forward here (ZeRO-3); call "
                               "kasa_regularization(model) after a training-mode forward pass")
        self.reg_cache = self.lora_A.reg_cache = self.lora_B.reg_cache = None
        return terms[0], terms[1] + terms[2]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) · ΔU · diag(ΔΣ) · ΔVᵀ, (m, n), float32."""
        b, diag, a = self.lora_B.weight.float(), self.lora_diag.float(), self.lora_A.weight.float()
        return (b * diag) @ a * self.scaling

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔUᵀΔU, ΔVᵀΔV), r×r, float32, differentiable."""
        b, a = self.lora_B.weight.float(), self.lora_A.weight.float()
        return b.T @ b, a @ a.T

    def regularization_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖ΔΣ‖², ‖ΔUᵀΔU − I_r‖_F + ‖ΔVᵀΔV − I_r‖_F) in float32, differentiable. Grams are r×r."""
        gram_b, gram_a = self.grams()
        eye = torch.eye(self.r, device=gram_a.device)
        orth = torch.linalg.norm(gram_b - eye) + torch.linalg.norm(gram_a - eye)
        return self.lora_diag.float().square().sum(), orth

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW into the base weight in place (forward then skips the adapter branch)."""
        if is_4bit(self.base_layer):
            raise ValueError("a 4-bit base cannot absorb ΔW in place; use merge_kasa, which dequantizes into a 16-bit "
                             "nn.Linear")
        if not self.merged:
            w = self.base_layer.weight
            w.add_(self.delta_weight().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.delta_weight().to(w.dtype))
            self.merged = False

    @torch.no_grad()
    def merged_module(self) -> nn.Module:
        """The plain layer computing W_world + ΔW: the base itself (merged in place), or for a 4-bit base a new
        nn.Linear in its compute dtype holding the dequantized effective weight + ΔW."""
        if not is_4bit(self.base_layer):
            self.merge()
            return self.base_layer
        base = self.base_layer
        dtype = base.compute_dtype or torch.float32
        linear = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter((effective_weight(self) + self.delta_weight()).to(dtype), requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().to(dtype), requires_grad=False)
        return linear

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "lora_A.weight", self.lora_A.weight
        yield "lora_B.weight", self.lora_B.weight
        yield "lora_diag", self.lora_diag

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


class _OrthogonalityPenalty(torch.autograd.Function):
    """‖G − I_r‖_F with G = W Wᵀ (``rows``: W = lora_A, r×n) or Wᵀ W (W = lora_B, m×r); gradient computed in forward.

    With E = G − I (r×r, symmetric): ∂‖E‖_F/∂W = 2·E·W / ‖E‖_F (rows) or 2·W·E / ‖E‖_F (cols); 0 where ‖E‖ = 0.
    Only the gradient is saved, never W: under ZeRO-3 W is released after its module's forward.
    """

    @staticmethod
    def forward(ctx, weight: torch.Tensor, rows: bool):
        w = weight.float()
        e = (w @ w.T if rows else w.T @ w) - torch.eye(w.shape[0] if rows else w.shape[1], device=w.device)
        norm = torch.linalg.norm(e)
        grad = (2 * (e @ w if rows else w @ e) / norm) if norm > 0 else torch.zeros_like(w)
        ctx.save_for_backward(grad.to(weight.dtype))
        return norm

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return g * grad, None


class _SquaredNorm(torch.autograd.Function):
    """‖d‖² with its gradient 2d saved in forward (not d itself)."""

    @staticmethod
    def forward(ctx, d: torch.Tensor):
        ctx.save_for_backward(2 * d.detach())
        return d.float().square().sum()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return g * grad


class AdapterFactor(nn.Linear):
    """lora_A / lora_B: a bias-free linear that can compute its own orthogonality term inside its forward.

    ``rows`` picks the r×r Gram: W Wᵀ for lora_A (r×n), Wᵀ W for lora_B (m×r).
    """

    def __init__(self, in_features: int, out_features: int, rows: bool, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self.rows = rows
        self.regularize_in_forward = False
        self.reg_cache: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if self.regularize_in_forward and self.training and torch.is_grad_enabled():
            self.reg_cache = _OrthogonalityPenalty.apply(self.weight, self.rows)
            y = y + 0.0 * self.reg_cache  # exact; ties the term's backward to this module's (gathered) backward
        return y


def kasa_layers(model: nn.Module) -> Iterator[tuple[str, KaSALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, KaSALinear):
            yield name, module


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")
