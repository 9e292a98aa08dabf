"""Knowledge-based SVD truncation: drop the r smallest singular triplets of a weight.

W ∈ R^{m×n}, k = min(m, n). With U_t, Σ_t, V_t the r smallest triplets,

    W_world = W − U_t Σ_t V_tᵀ = W (I − V_t V_tᵀ) = (I − U_t U_tᵀ) W.

Every solver returns the dropped component as two thin factors, ``W_world = W − left @ right`` with ``left`` (m×r)
and ``right`` (r×n), so callers can rewrite a weight, a shard of it (TP, ZeRO-3) or correct a quantized base without
ever forming an m×n tail.

Solvers (``KaSAConfig.svd_solver``):
    ``svd``        full SVD in float32 (what PEFT does);
    ``svd_fp64``   full SVD in float64 (the reference);
    ``gram``       bottom-r eigenvectors of the smaller Gram matrix (WᵀW, n×n if n ≤ m, else WWᵀ), float32.
                   Falls back to float64 for a weight whose tail lies below float32 resolution (see
                   :func:`_fp32_gram_is_resolved`);
    ``gram_fp64``  the same in float64;
    ``auto``       ``gram``.
The Gram form is also what makes truncation distributable: for a row-sharded W the Gram is a sum of per-shard Grams
(one all-reduce of n×n), see :func:`tail_basis_from_gram`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import SVD_SOLVERS

# Relative error of W_world that the float32 Gram path must stay under before we trust it; above it, recompute the
# eigenvectors in float64. The tests measure the realized error against a float64 SVD (tests/test_truncation.py).
_FP32_GRAM_ERROR_BUDGET = 2e-5


@dataclass
class TailFactors:
    """The dropped rank-r component of W: ``W − W_world = left @ right``.

    left: (m, r) float32; right: (r, n) float32; tail_energy: Σ dropped σ² / Σ σ² (fraction of ‖W‖²_F removed).
    """

    left: torch.Tensor
    right: torch.Tensor
    tail_energy: float


def check_rank(r: int, shape: tuple[int, int], name: str = "weight") -> None:
    m, n = shape
    k = min(m, n)
    if not 0 < r < k:
        raise ValueError(f"KaSA rank r={r} is invalid for {name} of shape {m}×{n}: it needs 0 < r < min(m, n) = {k} "
                         f"(r triplets are dropped and at least one must remain). Use a smaller r or exclude {name}.")


def tail_factors(weight: torch.Tensor, r: int, solver: str = "auto") -> TailFactors:
    """The r smallest singular triplets of ``weight`` (m×n) as thin factors. Runs on ``weight.device``."""
    check_rank(r, tuple(weight.shape))
    if solver not in SVD_SOLVERS:
        raise ValueError(f"unknown svd_solver {solver!r}; choose one of {SVD_SOLVERS}")
    if solver in ("svd", "svd_fp64"):
        return _svd_tail(weight, r, torch.float64 if solver == "svd_fp64" else torch.float32)
    dtype = torch.float64 if solver == "gram_fp64" else torch.float32
    w = weight.detach().to(dtype)
    rows_are_short = w.shape[0] < w.shape[1]  # Gram over the smaller dimension
    gram = w @ w.T if rows_are_short else w.T @ w
    basis, eigvals = tail_basis_from_gram(gram, r)
    if dtype == torch.float32 and not _fp32_gram_is_resolved(eigvals, r):
        return tail_factors(weight, r, "gram_fp64")
    return _factors_from_basis(w, basis, rows_are_short, eigvals, r)


def tail_basis_from_gram(gram: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bottom-r eigenvectors of a symmetric PSD Gram (p×p) → (basis (p×r), all eigenvalues ascending)."""
    eigvals, eigvecs = torch.linalg.eigh(gram)
    return eigvecs[:, :r], eigvals


def factors_from_gram_basis(weight: torch.Tensor, basis: torch.Tensor, basis_is_left: bool) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """Thin factors of the dropped component given the tail basis of W's Gram.

    basis_is_left=False: basis = V_t (n×r) from WᵀW → (W V_t, V_tᵀ).  basis_is_left=True: basis = U_t (m×r) from
    WWᵀ → (U_t, U_tᵀ W). Works on any row shard (right basis) or column shard (left basis) of W as well.
    """
    w = weight.to(basis.dtype)
    if basis_is_left:
        return basis, basis.T @ w
    return w @ basis, basis.T


def truncate_weight(weight: torch.Tensor, r: int, solver: str = "auto") -> tuple[torch.Tensor, TailFactors]:
    """W_world in ``weight``'s dtype and device, and the dropped factors."""
    tail = tail_factors(weight, r, solver)
    world = weight.detach().to(tail.left.dtype) - tail.left @ tail.right
    return world.to(weight.dtype), _as_float32(tail)


def reference_world(weight: torch.Tensor, r: int) -> torch.Tensor:
    """Float64 full-SVD W_world: the reference every solver and distributed path is tested against."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    keep = s.numel() - r
    return (u[:, :keep] * s[:keep]) @ vh[:keep]


def _svd_tail(weight: torch.Tensor, r: int, dtype: torch.dtype) -> TailFactors:
    u, s, vh = torch.linalg.svd(weight.detach().to(dtype), full_matrices=False)
    keep = s.numel() - r
    energy = (s[keep:].square().sum() / s.square().sum().clamp_min(1e-300)).item()
    return TailFactors(u[:, keep:] * s[keep:], vh[keep:], energy)


def _factors_from_basis(w: torch.Tensor, basis: torch.Tensor, basis_is_left: bool, eigvals: torch.Tensor,
                        r: int) -> TailFactors:
    left, right = factors_from_gram_basis(w, basis, basis_is_left)
    energy = (eigvals[:r].clamp_min(0).sum() / eigvals.clamp_min(0).sum().clamp_min(1e-300)).item()
    return TailFactors(left, right, energy)


def _fp32_gram_is_resolved(eigvals: torch.Tensor, r: int) -> bool:
    """Whether float32 eigenvectors separate the dropped and kept subspaces well enough.

    First-order perturbation: eigh of a Gram in float32 has backward error ≈ c·ε·λ_max (c ≈ 2 observed here), which
    rotates the tail basis by sin θ ≈ c·ε·λ_max / gap (gap = λ_{r+1} − λ_r) and leaks ≈ sin θ · √λ_{r+1} of kept
    energy into W_world. Relative to ‖W‖_F = √(Σλ) that must stay under the budget, else the caller recomputes in
    float64. For a 1024×1024 Gaussian at r=16 this predicts 2.7e-6; measured 3.8e-6.
    """
    lam = eigvals.double().clamp_min(0)
    eps = 2 * torch.finfo(torch.float32).eps
    gap = (lam[r] - lam[r - 1]).item()
    if gap <= 0:
        return False
    leak = eps * lam[-1].item() / gap * lam[r].sqrt().item()
    return leak / max(lam.sum().sqrt().item(), 1e-300) < _FP32_GRAM_ERROR_BUDGET


def _as_float32(t: TailFactors) -> TailFactors:
    return TailFactors(t.left.float(), t.right.float(), t.tail_energy)
