"""KaSALinear: a frozen (truncated) base linear layer plus the trainable SVD-form update.

    y = base(x) − L·(R·x) + (α/r) · ΔU · diag(ΔΣ) · ΔVᵀ · dropout(x)

Parameter names follow PEFT's KaSA variant so state dicts map one to one:
    lora_A.weight  (r, n)  = ΔVᵀ   Kaiming-uniform at init (kasa_ds.core.init)
    lora_B.weight  (m, r)  = ΔU    zeros at init (so ΔW = 0)
    lora_diag      (r,)    = ΔΣ    N(0, 1) at init
    base_layer               the frozen base computing W_world x (or W x, with the correction below)
    tail_left, tail_right    optional frozen correction L (m, r), R (r, n): set when the base cannot be rewritten
                             (a quantized one kept as is), so the layer computes (W − L R) x

The layer knows no base format and no placement: a sharded placement passes the full input width and this rank's
columns (same init at every sharding) and may ask for the regularizer terms inside forward.
"""

from __future__ import annotations

from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_adapter_
from .penalty import OrthogonalityPenalty, SquaredNorm, gram, orthogonality


class KaSALinear(nn.Module):
    """KaSA adapter around a base linear layer.

    Args:
        base_layer: the frozen layer computing x ↦ W_world x + b; its weight must already be truncated
            (see :func:`kasa_ds.inject.apply_kasa`).
        in_features, out_features: n and m of the weight this rank holds.
        r, alpha, dropout, beta, gamma: as in :class:`kasa_ds.KaSAConfig`.
        adapter_dtype: dtype of the adapter parameters.
        full_in_features, in_columns: the unsplit input width and this rank's columns of it (input-sharded bases).

    forward: (..., n) → (..., m), in the dtype the base layer returns.
    """

    #: whether kasa_regularization may stack this layer's factors with others of its rank (no collective needed)
    stackable_terms = True
    #: where the base lives (a kasa_ds.placements Placement), recorded by the injection that wrapped it; io/ asks it
    #: to gather and load this layer's adapter tensors. The layer itself never consults it.
    placement = None

    def __init__(self, base_layer: nn.Module, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float = 0.0, beta: float = 1e-4, gamma: float = 1e-3,
                 adapter_dtype: torch.dtype = torch.float32, full_in_features: Optional[int] = None,
                 in_columns: Optional[Union[slice, torch.Tensor]] = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.full_in_features, self.in_columns = full_in_features or in_features, in_columns
        self.scaling = alpha / r
        self.beta, self.gamma = beta, gamma
        device = _device_of(base_layer)
        self.lora_A = AdapterFactor(in_features, r, rows=True, device=device, dtype=adapter_dtype)
        self.lora_B = AdapterFactor(r, out_features, rows=False, device=device, dtype=adapter_dtype)
        self.lora_diag = nn.Parameter(torch.empty(r, device=device, dtype=adapter_dtype))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.register_buffer("tail_left", None)  # (m, r)
        self.register_buffer("tail_right", None)  # (r, n)
        # a partitioned placement holds a parameter whole only inside its own module's forward: each of ΔΣ, ΔVᵀ, ΔU
        # then computes its regularizer term there (set_regularize_in_forward) and kasa_regularization sums them
        self.regularize_in_forward = False
        self.reg_cache: Optional[torch.Tensor] = None
        self.reset_adapter()

    def reset_adapter(self, generator: Optional[torch.Generator] = None) -> None:
        """PEFT's KaSA init (:func:`kasa_ds.core.init.init_adapter_`); ΔW = 0 whatever the generator."""
        init_adapter_(self.lora_A.weight, self.lora_B.weight, self.lora_diag, self.full_in_features,
                      self.in_columns, generator)

    def set_base_correction(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """Subtract the frozen rank-r ``left @ right`` from the base in forward (a base kept untouched)."""
        self.tail_left, self.tail_right = left.detach().contiguous(), right.detach().contiguous()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        if self.tail_left is not None:
            if isinstance(self.lora_dropout, nn.Identity) and not self.regularize_in_forward:
                # one input: the correction and the update as one rank-2r product (CorrectedUpdate)
                return result + CorrectedUpdate.apply(x, self.tail_right, self.tail_left, self.lora_A.weight,
                                                      self.lora_diag, self.lora_B.weight, self.scaling
                                                      ).to(result.dtype)
            xt = x.to(self.tail_right.dtype)
            result = result - ((xt @ self.tail_right.T) @ self.tail_left.T).to(result.dtype)
        return result + self.update(x).to(result.dtype)

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """(α/r) · ΔU · diag(ΔΣ) · ΔVᵀ · dropout(x): (..., n) → (..., m)."""
        h = self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype)))
        diag = self.lora_diag
        if self.regularize_in_forward and self.training and torch.is_grad_enabled():
            self.reg_cache = SquaredNorm.apply(diag)
            h = h + 0.0 * self.reg_cache  # exact; ties the term's backward to this layer's (gathered) backward
        return self.lora_B(h, diag, self.scaling)

    def set_regularize_in_forward(self, enabled: bool = True) -> None:
        self.regularize_in_forward = self.lora_A.regularize_in_forward = self.lora_B.regularize_in_forward = enabled

    def cached_regularization_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖ΔΣ‖², orthogonality) from the last training forward; each forward's terms are returned once."""
        terms = (self.reg_cache, self.lora_A.reg_cache, self.lora_B.reg_cache)
        if any(t is None for t in terms):
            raise RuntimeError("the KaSA regularizer is computed in the layers' forward here (partitioned adapters, "
                               "e.g. ZeRO-3); call kasa_regularization(model) after a training-mode forward pass")
        self.reg_cache = self.lora_A.reg_cache = self.lora_B.reg_cache = None
        return terms[0], terms[1] + terms[2]

    def delta_weight(self) -> torch.Tensor:
        """ΔW = (α/r) · ΔU · diag(ΔΣ) · ΔVᵀ, (m, n), float32."""
        b, diag, a = self.lora_B.weight.float(), self.lora_diag.float(), self.lora_A.weight.float()
        return (b * diag) @ a * self.scaling

    def grams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ΔUᵀΔU, ΔVᵀΔV), r×r, float32, differentiable."""
        return gram(self.lora_B.weight, rows=False), gram(self.lora_A.weight, rows=True)

    def regularization_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖ΔΣ‖², ‖ΔUᵀΔU − I_r‖_F + ‖ΔVᵀΔV − I_r‖_F) in float32, differentiable."""
        gram_b, gram_a = self.grams()
        return self.lora_diag.float().square().sum(), orthogonality(gram_b) + orthogonality(gram_a)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ΔW (and a base correction) into the base weight in place; forward then skips the adapter branch."""
        w = self.base_layer.weight
        if type(w) is not nn.Parameter or not w.is_floating_point():
            raise ValueError(f"the base weight is a {type(w).__name__} of {w.dtype} (e.g. quantized) and cannot absorb "
                             "ΔW in place; use kasa_ds.merge_kasa, which builds a float linear through the base's "
                             "format")
        if not self.merged:
            w.add_(self.effective_delta().to(w.dtype))
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            w = self.base_layer.weight
            w.sub_(self.effective_delta().to(w.dtype))
            self.merged = False

    def effective_delta(self) -> torch.Tensor:
        """What merging adds to the base weight: ΔW minus the base correction, (m, n), float32."""
        delta = self.delta_weight()
        if self.tail_left is not None:
            delta = delta - self.tail_left.float() @ self.tail_right.float()
        return delta

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        yield "lora_A.weight", self.lora_A.weight
        yield "lora_B.weight", self.lora_B.weight
        yield "lora_diag", self.lora_diag

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"


class AdapterFactor(nn.Linear):
    """lora_A / lora_B: a bias-free linear that can compute its own orthogonality term inside its forward.

    ``rows`` picks the r×r Gram: W Wᵀ for lora_A (r×n), Wᵀ W for lora_B (m×r).
    """

    def __init__(self, in_features: int, out_features: int, rows: bool, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=False, **kwargs)
        self.rows = rows
        self.regularize_in_forward = False
        self.reg_cache: Optional[torch.Tensor] = None

    def forward(self, x: torch.Tensor, diag: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
        """x Wᵀ, or (x ⊙ ``diag`` · ``scale``) Wᵀ (lora_B after ΔΣ and α/r) through :class:`DiagLinear`."""
        y = super().forward(x) if diag is None else DiagLinear.apply(x, diag, self.weight, scale)
        if self.regularize_in_forward and self.training and torch.is_grad_enabled():
            self.reg_cache = OrthogonalityPenalty.apply(self.weight, self.rows)
            y = y + 0.0 * self.reg_cache  # exact; ties the term's backward to this module's (gathered) backward
        return y


class DiagLinear(torch.autograd.Function):
    """y = (h ⊙ d·s) Wᵀ for h (..., r), d (r,), W (m, r) and a constant s (LoRA's α/r), saving h and not h ⊙ d: the
    tensors a LoRA's lora_B saves, no more (plain autograd would keep both h, for d's gradient, and h ⊙ d, for W's).
    s scales the r-vector d, not the (..., m) output as a LoRA's ``lora_B(h) * scaling`` does: one multiply of r
    elements instead of tokens × m, each way. h ⊙ d·s is recomputed in backward (tokens × r multiplies). Backward
    computes in the forward output's dtype (as autocast did) and returns each gradient in its input's dtype."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, d: torch.Tensor, w: torch.Tensor, s: float = 1.0) -> torch.Tensor:
        ds = d * s
        y = F.linear(h * ds, w)
        ctx.save_for_backward(h, ds, w)
        ctx.s, ctx.compute_dtype = s, y.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        h, ds, w = ctx.saved_tensors
        r, dtype = ds.shape[0], ctx.compute_dtype
        gy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)  # (T, m)
        grad_hd = gy @ w.to(dtype)  # ∂/∂(h ⊙ d·s), (T, r)
        h2 = h.reshape(-1, r)
        grad_h = grad_d = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_hd * ds.to(dtype)).to(h.dtype).view(h.shape)
        if ctx.needs_input_grad[1]:  # summed over every token: in float32 whatever the compute dtype
            grad_d = ((grad_hd.float() * h2.float()).sum(0) * ctx.s).to(ds.dtype)
        if ctx.needs_input_grad[2]:
            grad_w = (gy.T @ (h2.to(dtype) * ds.to(dtype))).to(w.dtype)
        return grad_h, grad_d, grad_w, None


class CorrectedUpdate(torch.autograd.Function):
    """−L·(R·x) + s·ΔU·diag(ΔΣ)·ΔVᵀ·x in two GEMMs of width 2r instead of four of width r (a base kept as it is,
    with its tail subtracted in forward, and no adapter dropout: both products read the same x):

        H = x·[R; ΔVᵀ]ᵀ  (…, 2r)       y = [H_R | H_A ⊙ ΔΣ]·[−L | s·ΔU]ᵀ  (…, m)

    for x (…, n), R (r, n), L (m, r), ΔVᵀ (r, n), ΔΣ (r,), ΔU (m, r). Saves x, H_A (what a LoRA saves; H_R is
    not needed in backward, which the separate products would keep) and the factors themselves (the concatenations
    are rebuilt in backward); backward is four GEMMs (six separately) and computes no gradient for the frozen L, R. Computes in the adapter's dtype; each
    gradient is returned in its input's dtype."""

    @staticmethod
    def forward(ctx, x, right, left, a, d, b, scaling: float):
        h = F.linear(x.to(a.dtype), _stacked_inputs(right, a))
        r = a.shape[0]
        h_a = h[..., r:].contiguous()  # backward needs H_A only: H_R is not kept
        ctx.save_for_backward(x, h_a, right, left, a, d, b)
        ctx.scaling = scaling
        return F.linear(torch.cat([h[..., :r], h_a * d], dim=-1), _stacked_outputs(left, b, scaling))

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, h_a, right, left, a, d, b = ctx.saved_tensors
        r = d.shape[0]
        grad_y = grad_y.to(a.dtype)
        grad_hd = grad_y @ _stacked_outputs(left, b, ctx.scaling)  # (…, 2r): ∂/∂H_R and ∂/∂(H_A ⊙ ΔΣ)
        grad_h = torch.cat([grad_hd[..., :r], grad_hd[..., r:] * d], dim=-1)
        grad_x = (grad_h @ _stacked_inputs(right, a)).to(x.dtype) if ctx.needs_input_grad[0] else None
        h_a = h_a.reshape(-1, r)
        grad_d = (grad_hd[..., r:].reshape(-1, r) * h_a).sum(0) if ctx.needs_input_grad[4] else None
        grad_b = None
        if ctx.needs_input_grad[5]:
            grad_b = grad_y.reshape(-1, grad_y.shape[-1]).T @ (h_a * d) * ctx.scaling
        grad_a = None
        if ctx.needs_input_grad[3]:
            grad_a = grad_h[..., r:].reshape(-1, r).T @ x.reshape(-1, x.shape[-1]).to(a.dtype)
        return grad_x, None, None, grad_a, grad_d, grad_b, None


def _stacked_inputs(right: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """[R; ΔVᵀ] (2r, n) in the adapter's dtype."""
    return torch.cat([right.to(a.dtype), a])


def _stacked_outputs(left: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """[−L | s·ΔU] (m, 2r) in the adapter's dtype."""
    return torch.cat([-left.to(b.dtype), b * scaling], dim=1)


def kasa_layers(model: nn.Module) -> Iterator[tuple[str, KaSALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, KaSALinear):
            yield name, module


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    weight = getattr(module, "weight", None)  # a view of another module's weight (placements.tp.fused)
    return weight.device if isinstance(weight, torch.Tensor) else torch.device("cpu")
