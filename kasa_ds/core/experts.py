"""KaSA on mixture-of-experts weights held as fused 3-D parameters (transformers 5.x ``*Experts`` modules).

A fused experts module holds, for E experts, ``gate_up_proj`` and ``down_proj`` as 3-D parameters (Mixtral,
Qwen3-MoE, OLMoE, DeepSeek-V3: [E, 2I, H] and [E, H, I], gate and up concatenated; gpt-oss: transposed [E, H, 2I] /
[E, I, H], gate and up interleaved, with biases). transformers marks the layout on the module
(``use_experts_implementation``: ``is_transposed``, ``is_concatenated``, ``has_gate``, ``has_bias``).

Each expert's gate, up and down projection is a weight of its own (m×n, out × in) and is truncated by its own r
smallest triplets; :class:`KaSAExperts` holds per projection

    lora_A    (E, r, n)  ΔVᵀ of every expert     lora_B (E, m, r)  ΔU      lora_diag (E, r)  ΔΣ

and adds expert e's (α/r)·ΔU_e·diag(ΔΣ_e)·ΔV_eᵀ·x to the tokens routed to e, next to the base projection, through
the module's own gating (``_apply_gate``, ``act_fn``); no dense [E, m, n] ΔW is formed. Like KaSALinear, the layer
knows no placement: the base parameters already hold W_world when it is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .init import init_adapter_
from .layer import DiagLinear
from .penalty import OrthogonalityPenalty, SquaredNorm, orthogonality
from .truncation import tail_factors

#: the projections of an expert, as PEFT and the per-expert-linear checkpoints name them
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
#: the fused parameter each projection lives in, and the projections a fused name stands for
FUSED = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",), "up_proj": ("up_proj",)}


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts module stores its projections (read from the module, never assumed)."""

    num_experts: int
    hidden: int
    intermediate: int
    transposed: bool
    concatenated: bool
    has_gate: bool
    has_bias: bool

    def projections(self) -> tuple[str, ...]:
        return PROJECTIONS if self.has_gate else ("up_proj", "down_proj")

    def shape(self, projection: str) -> tuple[int, int]:
        """(m, n) = (out, in) of one expert's ``projection``."""
        return (self.hidden, self.intermediate) if projection == "down_proj" else (self.intermediate, self.hidden)


def experts_layout(module: nn.Module, shape_of: Callable[[torch.Tensor], tuple[int, ...]] = lambda p: tuple(p.shape)
                   ) -> Optional[ExpertsLayout]:
    """The layout of a transformers fused experts module, or None for any other module. ``shape_of``: a parameter's
    whole shape (the registry's, which knows partitioned parameters)."""
    if not hasattr(module, "is_transposed") or not isinstance(getattr(module, "down_proj", None), nn.Parameter):
        return None
    has_gate = bool(getattr(module, "has_gate", True))
    fused = module.gate_up_proj if has_gate else getattr(module, "up_proj", None)
    if not isinstance(fused, nn.Parameter) or len(shape_of(fused)) != 3 or len(shape_of(module.down_proj)) != 3:
        return None
    down = shape_of(module.down_proj)
    hidden, intermediate = (down[2], down[1]) if module.is_transposed else (down[1], down[2])
    return ExpertsLayout(down[0], hidden, intermediate, bool(module.is_transposed),
                         bool(getattr(module, "is_concatenated", True)), has_gate, bool(getattr(module, "has_bias", False)))


def parameter_name(layout: ExpertsLayout, projection: str) -> str:
    """The fused parameter of the experts module that holds ``projection``."""
    if projection == "down_proj":
        return "down_proj"
    return "gate_up_proj" if layout.has_gate else "up_proj"


def projection_view(fused: torch.Tensor, layout: ExpertsLayout, projection: str) -> torch.Tensor:
    """A view (E', m, n) of ``projection`` inside ``fused``: the parameter :func:`parameter_name` names, or any
    tensor laid out as it is over a range of E' experts (writes go through)."""
    w = fused.transpose(1, 2) if layout.transposed else fused  # (E', m, n), or (E', 2I, H) for gate_up
    if projection == "down_proj" or not layout.has_gate:
        return w
    half = layout.intermediate
    first = projection == "gate_proj"
    if layout.concatenated:
        return w[:, :half] if first else w[:, half:]
    return w[:, 0::2] if first else w[:, 1::2]


def projection_weight(module: nn.Module, layout: ExpertsLayout, projection: str) -> torch.Tensor:
    """A view (E, m, n) of every expert's ``projection`` inside the module's fused parameter (writes go through)."""
    return projection_view(getattr(module, parameter_name(layout, projection)), layout, projection)


def expert_tails(weights: torch.Tensor, r: int, solver: str, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Each expert's dropped tail of ``weights`` (E', m, n): (left (E', m, r), right (E', r, n), float32, and the
    largest fraction of an expert's energy dropped), by the one solver ladder (kasa_ds.core.truncation), expert by
    expert."""
    tails = [tail_factors(w, r, solver, name=f"{name}[expert {e}]") for e, w in enumerate(weights)]
    return (torch.stack([t.left.float() for t in tails]), torch.stack([t.right.float() for t in tails]),
            max(t.tail_energy for t in tails))


class ExpertFactors(nn.Module):
    """ΔVᵀ (E, r, n), ΔU (E, m, r), ΔΣ (E, r) of one projection of every expert."""

    def __init__(self, experts: int, m: int, n: int, r: int, device, dtype) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.empty(experts, r, n, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(experts, m, r, device=device, dtype=dtype))
        self.lora_diag = nn.Parameter(torch.empty(experts, r, device=device, dtype=dtype))

    def reset(self, generator: Optional[torch.Generator] = None) -> None:
        """PEFT's KaSA init per expert (:func:`kasa_ds.core.init.init_adapter_`); ΔW = 0."""
        for a, b, d in zip(self.lora_A, self.lora_B, self.lora_diag):
            init_adapter_(a, b, d, a.shape[1], None, generator)

    def update(self, expert: int, x: torch.Tensor, scaling: float) -> torch.Tensor:
        """(α/r)·ΔU_e·diag(ΔΣ_e)·ΔV_eᵀ·x for the rows x (tokens, n) → (tokens, m)."""
        h = x.to(self.lora_A.dtype) @ self.lora_A[expert].T
        return DiagLinear.apply(h, self.lora_diag[expert], self.lora_B[expert], scaling)  # saves h only

    def delta_weight(self, scaling: float) -> torch.Tensor:
        """ΔW of every expert, (E, m, n), float32 (merging only)."""
        return torch.bmm(self.lora_B.float() * self.lora_diag.float()[:, None, :], self.lora_A.float()) * scaling

    def regularization_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per expert (‖ΔΣ_e‖², ‖ΔU_eᵀΔU_e − I‖_F + ‖ΔV_eᵀΔV_e − I‖_F), each (E,), float32, batched."""
        a, b = self.lora_A.float(), self.lora_B.float()
        grams_b, grams_a = b.transpose(1, 2) @ b, a @ a.transpose(1, 2)
        return self.lora_diag.float().square().sum(-1), orthogonality(grams_b) + orthogonality(grams_a)


class KaSAExperts(nn.Module):
    """KaSA around a fused experts module (``base_layer``, its parameters already W_world for ``projections``).

    forward(hidden (T, H), top_k_index (T, K), top_k_weights (T, K)) → (T, H), the experts module's own signature:
    tokens are grouped by expert; expert e computes its base projections with the module's weights, adds its
    low-rank updates, gates with the module's ``_apply_gate`` (or ``act_fn``) and is weighted by its routing weight.
    """

    stackable_terms = True
    placement = None  # recorded by the injection, as on KaSALinear

    def __init__(self, base_layer: nn.Module, layout: ExpertsLayout, projections: tuple[str, ...], r: int,
                 alpha: float, dropout: float = 0.0, beta: float = 1e-4, gamma: float = 1e-3,
                 adapter_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer, self.layout, self.r = base_layer, layout, r
        self.scaling, self.beta, self.gamma = alpha / r, beta, gamma
        device = base_layer.down_proj.device
        self.lora = nn.ModuleDict({p: ExpertFactors(layout.num_experts, *layout.shape(p), r, device, adapter_dtype)
                                   for p in projections})
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        # a partitioned placement (ZeRO-3) holds the factors whole only inside this module's forward: the
        # regularizer terms are then computed there (set_regularize_in_forward), as KaSALinear does
        self.regularize_in_forward = False
        self.reg_cache: Optional[tuple[torch.Tensor, torch.Tensor]] = None
        self.reset_adapter()

    def set_regularize_in_forward(self, enabled: bool = True) -> None:
        self.regularize_in_forward = enabled

    def reset_adapter(self, generator: Optional[torch.Generator] = None) -> None:
        for factors in self.lora.values():
            factors.reset(generator)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                *args, **kwargs) -> torch.Tensor:
        if self.merged:
            return self.base_layer(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        tokens, k = top_k_index.shape
        experts = top_k_index.reshape(-1)
        valid = experts < self.layout.num_experts  # expert-parallel sentinels route nowhere
        order = torch.argsort(torch.where(valid, experts, self.layout.num_experts), stable=True)
        counts = torch.bincount(experts[valid], minlength=self.layout.num_experts).tolist()
        rows = hidden_states.repeat_interleave(k, dim=0)[order]
        out = torch.zeros(tokens * k, hidden_states.shape[-1], dtype=torch.float32, device=hidden_states.device)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                picked = order[start:start + count]
                out[picked] = self.expert_forward(expert, rows[start:start + count]).float()
                start += count
        weighted = out * top_k_weights.reshape(-1, 1).float()
        result = weighted.view(tokens, k, -1).sum(dim=1).to(hidden_states.dtype)
        if self.regularize_in_forward and self.training and torch.is_grad_enabled():
            self.reg_cache = self._terms_in_forward()
            # exact; ties the terms' backward to this module's backward, while its factors are gathered
            result = result + 0.0 * (self.reg_cache[0].sum() + self.reg_cache[1].sum()).to(result.dtype)
        return result

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """One expert on its routed rows x (tokens, H) → (tokens, H)."""
        base, layout = self.base_layer, self.layout
        fused = base.gate_up_proj if layout.has_gate else base.up_proj
        bias = (base.gate_up_proj_bias if layout.has_gate else base.up_proj_bias)[e] if layout.has_bias else None
        h = self._linear(x, fused[e], bias) + self._fused_update(e, x).to(x.dtype)
        h = base._apply_gate(h) if layout.has_gate else base.act_fn(h)
        y = self._linear(h, base.down_proj[e], base.down_proj_bias[e] if layout.has_bias else None)
        if "down_proj" in self.lora:
            y = y + self.lora["down_proj"].update(e, self.lora_dropout(h), self.scaling).to(y.dtype)
        if getattr(base, "has_post_expert_norm", False):
            y = base.post_expert_norm(y)
        return y

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return F.linear(x, weight.T if self.layout.transposed else weight, bias)

    def _fused_update(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """The low-rank updates of the projections in the fused gate/up output, in its layout (zeros elsewhere)."""
        x = self.lora_dropout(x)
        parts = [self.lora[p].update(e, x, self.scaling) if p in self.lora
                 else x.new_zeros(x.shape[0], self.layout.intermediate, dtype=torch.float32)
                 for p in (("gate_proj", "up_proj") if self.layout.has_gate else ("up_proj",))]
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=-1) if self.layout.concatenated else torch.stack(parts, dim=-1).flatten(-2)

    def regularization_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(‖ΔΣ‖², orthogonality) per expert and projection, each (P·E,), float32, differentiable."""
        terms = [f.regularization_terms() for f in self.lora.values()]
        return torch.cat([t[0] for t in terms]), torch.cat([t[1] for t in terms])

    def _terms_in_forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`regularization_terms` with each gradient computed now (kasa_ds.core.penalty): nothing saved needs
        the factors after forward."""
        l2 = [SquaredNorm.apply(f.lora_diag) for f in self.lora.values()]
        orth = [OrthogonalityPenalty.apply(f.lora_A, True) + OrthogonalityPenalty.apply(f.lora_B, False)
                for f in self.lora.values()]
        return torch.cat(l2), torch.cat(orth)

    def cached_regularization_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The terms of the last training forward (regularize_in_forward); each forward's terms are returned once."""
        if self.reg_cache is None:
            raise RuntimeError("the KaSA regularizer of the experts is computed in their forward here (partitioned "
                               "adapters, e.g. ZeRO-3); call kasa_regularization(model) after a training-mode forward")
        terms, self.reg_cache = self.reg_cache, None
        return terms

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every expert's ΔW into the base parameters in place (a float base)."""
        if not self.merged:
            for p, factors in self.lora.items():
                view = projection_weight(self.base_layer, self.layout, p)
                view.add_(factors.delta_weight(self.scaling).to(view.dtype))
            self.merged = True

    def adapter_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        for p, factors in self.lora.items():
            yield f"{p}.lora_A.weight", factors.lora_A
            yield f"{p}.lora_B.weight", factors.lora_B
            yield f"{p}.lora_diag", factors.lora_diag

    def adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        """{adapter parameter name: full shape} (what an adapter file must hold for this module)."""
        return {name: tuple(p.shape) for name, p in self.adapter_parameters()}

    def extra_repr(self) -> str:
        return (f"experts={self.layout.num_experts}, projections={list(self.lora)}, r={self.r}, "
                f"scaling={self.scaling:g}")


def expert_layers(model: nn.Module) -> Iterator[tuple[str, KaSAExperts]]:
    for name, module in model.named_modules():
        if isinstance(module, KaSAExperts):
            yield name, module


def targeted_projections(name: str, layout: ExpertsLayout, is_target) -> tuple[str, ...]:
    """The projections of experts module ``name`` that ``is_target`` (KaSAConfig.is_target) selects: a projection
    is selected by its own name (``<name>.gate_proj``), by its fused parameter (``<name>.gate_up_proj``) or by the
    module (``<name>``)."""
    whole = is_target(name)
    return tuple(p for p in layout.projections()
                 if whole or is_target(f"{name}.{p}")
                 or any(is_target(f"{name}.{fused}") for fused, parts in FUSED.items() if p in parts))
