"""Knowledge-based SVD truncation: drop the r smallest singular triplets of a weight (one solver ladder).

W ∈ R^{m×n}, k = min(m, n). With U_t, Σ_t, V_t the r smallest triplets,

    W_world = W − U_t Σ_t V_tᵀ = W (I − V_t V_tᵀ) = (I − U_t U_tᵀ) W.

Every solver returns the dropped component as two thin factors, ``W_world = W − left @ right`` with ``left`` (m×r)
and ``right`` (r×n), so callers can rewrite a weight, a shard of it (TP, ZeRO-3) or correct a quantized base without
ever forming an m×n tail.

Solvers (``KaSAConfig.svd_solver``):
    ``svd``        full SVD in float32 (what PEFT does);
    ``svd_fp64``   full SVD in float64 (the reference);
    ``gram``       bottom-r eigenvectors of the smaller Gram matrix (WᵀW, n×n if n ≤ m, else WWᵀ), float32.
                   Where float32 cannot separate the r-th from the (r+1)-th eigenvector (small gap, see
                   :func:`_fp32_leak`), the bottom r+p float32 eigenvectors are refined by a float64 Rayleigh–Ritz
                   step on that small subspace; only if that is not enough either is the weight redone in float64
                   (one ladder, :func:`tail_basis`, serves whole weights and the reduced Grams of sharded ones);
    ``gram_fp64``  the same in float64;
    ``auto``       ``gram``.
The Gram form is also what makes truncation distributable: for a row-sharded W the Gram is a sum of per-shard Grams
(one all-reduce of n×n), and :func:`factors_from_gram_basis` applies a tail basis to any shard.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from ..config import SVD_SOLVERS

# Relative error of W_world that the float32 Gram path must stay under before we trust it; above it, recompute the
# eigenvectors in float64. The tests measure the realized error against a float64 SVD (tests/core/test_truncation.py).
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


def tail_factors(weight: torch.Tensor, r: int, solver: str = "auto", name: str = "weight") -> TailFactors:
    """The r smallest singular triplets of ``weight`` (m×n) as thin factors. Runs on ``weight.device``; a weight
    holding NaN or inf has no singular values: one ValueError naming ``name``."""
    check_rank(r, tuple(weight.shape), name)
    # a sum is one cheap pass and non-finite whenever an element is; only then the elementwise check (a finite
    # weight whose sum overflows is no error)
    if not torch.isfinite(weight.sum()) and not torch.isfinite(weight).all():
        raise ValueError(f"{name} holds NaN or inf: it has no singular values to truncate; the checkpoint is damaged "
                         "(re-download or re-convert it) or exclude the module from target_modules")
    if solver not in SVD_SOLVERS:
        raise ValueError(f"unknown svd_solver {solver!r}; choose one of {SVD_SOLVERS}")
    if solver in ("svd", "svd_fp64"):
        return _svd_tail(weight, r, torch.float64 if solver == "svd_fp64" else torch.float32)
    w = weight.detach().to(torch.float64 if solver == "gram_fp64" else torch.float32)
    left = w.shape[0] < w.shape[1]  # Gram over the smaller dimension: WWᵀ (basis U_t) or WᵀW (basis V_t)

    def gram_of(x: torch.Tensor) -> torch.Tensor:
        return symmetric_gram(x, left)

    def projected(q: torch.Tensor) -> torch.Tensor:  # qᵀ G q from W itself in float64, not from the float32 Gram
        y = (q.T @ w.double()).T if left else w.double() @ q
        return y.T @ y

    upper = _upper_gram(w, left)
    basis, energy = tail_basis(gram_of(w) if upper is None else upper, r, solver, projected=projected,
                               exact=lambda: gram_of(w.double()))
    # in w's precision: a float64 basis rounded to float32 moves W_world by ≈ ε·‖W‖, far under the error budget
    return TailFactors(*factors_from_gram_basis(w, basis.to(w.dtype), left), energy)


def symmetric_gram(w: torch.Tensor, left: bool) -> torch.Tensor:
    """W Wᵀ (``left``) or Wᵀ W."""
    return w @ w.T if left else w.T @ w


def _upper_gram(w: torch.Tensor, left: bool) -> Optional[np.ndarray]:
    """For a float32 weight on the CPU with SciPy, W Wᵀ (``left``) or Wᵀ W through BLAS ?syrk: one triangle, half
    a GEMM's flops, left as BLAS writes it — the upper triangle of a column-major array, the strict lower one 0 —
    since LAPACK's subset solver and ?symv read only that triangle; else None."""
    syrk = _scipy_syrk() if w.device.type == "cpu" and w.dtype == torch.float32 else None
    if syrk is None:
        return None
    # ?syrk forms A·Aᵀ (trans=0) fastest, from a column-major A: Wᵀ is one as it stands (a view); for W·Wᵀ SciPy
    # copies W into that order first, still faster than Wᵀ's view with trans=1 (measured)
    return syrk(1.0, w.numpy() if left else w.numpy().T, trans=0, lower=0)


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


def gram_tail_basis(gram: torch.Tensor, r: int, solver: str = "auto") -> tuple[torch.Tensor, float]:
    """Bottom-r eigenvectors (d×r, float64) of a float64 Gram (d×d) and the fraction of its trace they carry.

    The sharded paths reduce Grams in float64 (a float32 Gram alone cannot be refined: its own rounding is the
    ε·λ_max that limits eigh), then solve here with :func:`tail_basis`.
    """
    gram = gram.double()
    basis, energy = tail_basis(gram, r, solver)
    return basis.double(), energy


def tail_basis(gram: torch.Tensor, r: int, solver: str = "auto", *,
               projected: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
               exact: Optional[Callable[[], torch.Tensor]] = None) -> tuple[torch.Tensor, float]:
    """The one solver ladder: bottom-r eigenvectors (d×r) of a PSD Gram (d×d) and the trace fraction they carry.
    ``gram``: a tensor, or (from :func:`tail_factors`, which then passes ``projected`` and ``exact``) the upper
    triangle of a float32 column-major array (:func:`_upper_gram`).

    ``auto``/``gram``: float32 eigh, kept where :func:`_fp32_leak` says it resolves the tail (basis in float32); else
    a float64 Rayleigh–Ritz step on the bottom r+p float32 vectors where that suffices (float64 basis); else, and
    for every other solver, float64 eigh of ``exact()`` (default: the Gram in float64).
    ``projected(q)``: qᵀGq in float64 for an orthonormal d×p q (default: from ``gram`` in float64).
    """
    if solver in ("auto", "gram"):
        d = gram.shape[0]
        p = min(max(r, 16), d - r - 1)  # extra vectors for Rayleigh–Ritz; a kept direction must stay outside
        spectrum = _bottom_eigh32(gram if isinstance(gram, np.ndarray) else gram.float(), r + max(p, 0))
        energy = spectrum.energy(r)
        if spectrum.leak(r, r) < _FP32_GRAM_ERROR_BUDGET:
            return spectrum.vectors[:, :r], energy
        if p > 0 and spectrum.leak(r, r + p) < _FP32_GRAM_ERROR_BUDGET:
            q, _ = torch.linalg.qr(spectrum.vectors[:, :r + p].double())
            _, ritz_vecs = torch.linalg.eigh(projected(q) if projected else q.T @ gram.double() @ q)
            return q @ ritz_vecs[:, :r], energy
    eigvals, eigvecs = torch.linalg.eigh(exact() if exact else gram.double())
    return eigvecs[:, :r], _energy(eigvals, r)


@dataclass
class _Bottom:
    """The bottom of a float32 Gram's spectrum: eigenvalues 0..k (ascending), their first k vectors, an upper
    bound on the largest eigenvalue and the trace (the sum of all eigenvalues)."""

    values: torch.Tensor
    vectors: torch.Tensor
    lam_max: float
    trace: float

    def energy(self, r: int) -> float:
        return (self.values[:r].double().clamp_min(0).sum() / max(self.trace, 1e-300)).item()

    def leak(self, r: int, subspace: int) -> float:
        return _fp32_leak(self.values, r, subspace, self.lam_max, self.trace)


def _bottom_eigh32(gram: torch.Tensor | np.ndarray, k: int) -> _Bottom:
    """The bottom k+1 eigenpairs of a float32 Gram (d×d): on the CPU with SciPy, LAPACK's subset solver (?syevr
    computes only the wanted eigenvectors after the tridiagonal reduction) and λ_max estimated apart
    (:func:`_lam_max`); else torch's full eigh. An array is the upper triangle of :func:`_upper_gram`."""
    d = gram.shape[0]
    if isinstance(gram, np.ndarray):
        values, vectors = _scipy_eigh()(gram, lower=False, subset_by_index=[0, k], driver="evr", check_finite=False)
        symv = _scipy_symv()
        triangle = float(np.linalg.norm(gram)) ** 2  # the diagonal once, each off-diagonal pair once
        diagonal = float(np.square(np.diagonal(gram), dtype=np.float64).sum())
        lam_max = _lam_max(lambda x: torch.from_numpy(symv(1.0, gram, x.numpy(), lower=0)), d,
                           max(2 * triangle - diagonal, 0.0) ** 0.5)
        return _Bottom(torch.from_numpy(values), torch.from_numpy(vectors[:, :k]), lam_max,
                       float(np.trace(gram, dtype=np.float64)))
    if gram.device.type == "cpu" and k + 1 < d and _scipy_eigh() is not None:
        # the transposed view of a row-major symmetric matrix is itself in LAPACK's column-major order: no copy
        values, vectors = _scipy_eigh()(gram.numpy().T, subset_by_index=[0, k], driver="evr", check_finite=False)
        return _Bottom(torch.from_numpy(values), torch.from_numpy(vectors[:, :k]),
                       _lam_max(lambda x: gram @ x, d, torch.linalg.matrix_norm(gram).item()),
                       gram.diagonal().double().sum().item())
    values, vectors = torch.linalg.eigh(gram)
    return _Bottom(values[:k + 1], vectors[:, :k], values[-1].double().item(), values.double().sum().item())


def _lam_max(matvec: Callable[[torch.Tensor], torch.Tensor], d: int, frobenius: float,
             iterations: int = 30) -> float:
    """λ_max of a PSD Gram (d×d, applied by ``matvec`` to a float32 d-vector) for the leak estimate, without a full
    eigh: power iteration's Rayleigh quotient ρ plus its residual ‖Gx − ρx‖ (ρ approaches λ_max from below; with the
    residual it lands at or above it: measured on Gaussian and Llama-shaped Grams), capped by ‖G‖_F ≥ λ_max
    (``frobenius``, summed in float32: capped with a margin for its rounding). ``iterations`` products (d² each)."""
    x = torch.randn(d, generator=torch.Generator().manual_seed(0))
    for _ in range(iterations):
        x = matvec(x)
        x = x / x.norm().clamp_min(1e-30)
    gx = matvec(x)
    rho = torch.dot(x, gx).item()
    return min(rho + (gx - rho * x).norm().item(), frobenius * (1 + 1e-4))


def _scipy_eigh():
    """scipy.linalg.eigh, or None where SciPy is not installed (torch's full eigh is used then)."""
    try:
        from scipy.linalg import eigh
    except ImportError:
        return None
    return eigh


def _scipy_syrk():
    """BLAS ssyrk through SciPy, or None where SciPy is not installed (a GEMM is used then)."""
    try:
        from scipy.linalg.blas import ssyrk
    except ImportError:
        return None
    return ssyrk


def _scipy_symv():
    """BLAS ssymv through SciPy (present wherever :func:`_upper_gram` made an array)."""
    from scipy.linalg.blas import ssymv

    return ssymv


def _energy(eigvals: torch.Tensor, r: int) -> float:
    lam = eigvals.double().clamp_min(0)
    return (lam[:r].sum() / lam.sum().clamp_min(1e-300)).item()


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


def _fp32_leak(eigvals: torch.Tensor, r: int, subspace: int, lam_max: float, total: float) -> float:
    """Estimated relative error of W_world from float32 eigenvectors whose bottom ``subspace`` (≥ r) are resolved
    among themselves exactly (subspace > r: by the Rayleigh–Ritz step of :func:`tail_basis`).

    First-order perturbation: eigh of a Gram in float32 has backward error ≈ c·ε·λ_max (c ≈ 2 observed here), which
    mixes the subspace with the kept directions by sin θ ≈ c·ε·λ_max / gap (gap = λ_{subspace+1} − λ_r), leaking
    ≈ sin θ · √λ_{subspace+1} of kept energy into W_world, relative to ‖W‖_F = √(Σλ). For a 1024×1024 Gaussian at
    r = 16 (subspace = r) this predicts 2.7e-6; measured 3.8e-6. ``eigvals``: at least the bottom subspace+1;
    ``lam_max``: λ_max or an upper bound on it (a larger bound only makes the estimate more cautious); ``total``: Σλ.
    """
    lam = eigvals.double().clamp_min(0)
    gap = (lam[subspace] - lam[r - 1]).item()
    if gap <= 0:
        return float("inf")
    sin_theta = min(1.0, 2 * torch.finfo(torch.float32).eps * lam_max / gap)
    return sin_theta * lam[subspace].sqrt().item() / max(total, 1e-300) ** 0.5


def _as_float32(t: TailFactors) -> TailFactors:
    return TailFactors(t.left.float(), t.right.float(), t.tail_energy)
