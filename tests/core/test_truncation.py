"""Truncation against a float64 full-SVD reference, per solver.

Tolerances (relative Frobenius error of W_world, inputs float32):
- float64 solvers: ≤ 1e-7. The only error is rounding W_world back to float32 storage (≈ 2.5e-8 measured).
- float32 solvers: ≤ 1e-4, the accuracy the KaSA core issue asks of the fast path. Full float32 SVD reaches
  8e-5 on a real MiniLM weight at r = k−1; the Gram solver stays under ≈ 3.5e-5 (its float64 Rayleigh–Ritz refinement
  and fallback guard the ill-separated tails, see kasa_ds.core.truncation._fp32_leak).
"""

import pytest
import torch

from kasa_ds.training.assets import embedded_model_dir
from kasa_ds.core.truncation import check_rank, reference_world, tail_factors, truncate_weight

TOL = {"svd": 1e-4, "gram": 1e-4, "auto": 1e-4, "svd_fp64": 1e-7, "gram_fp64": 1e-7}
SHAPES = [(48, 48), (80, 40), (40, 80)]  # square, tall, wide


def decaying_spectrum(m, n, seed=0):
    """A matrix with singular values 1 … 1e-2 (log-spaced), like a trained weight's."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return ((u * torch.logspace(0, -2, k, dtype=torch.float64)) @ v.T).float()


def rel_err(world, ref):
    return ((world.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("solver", list(TOL))
@pytest.mark.parametrize("shape", SHAPES, ids=["square", "tall", "wide"])
@pytest.mark.parametrize("kind", ["gaussian", "decaying"])
def test_matches_float64_reference(solver, shape, kind):
    m, n = shape
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(1)) if kind == "gaussian" else decaying_spectrum(m, n)
    for r in (1, 8, min(m, n) - 1):
        world, tail = truncate_weight(w, r, solver)
        assert world.dtype == w.dtype and world.shape == w.shape
        ref = reference_world(w, r)
        assert rel_err(world, ref) <= TOL[solver], (solver, shape, r)
        # rank k − r: the reference's r smallest singular values are 0, so W_world's are at most ‖W_world − ref‖₂
        # (Weyl), which the error bound above caps at TOL·‖ref‖_F (measured at r = k − 1 on a Gaussian 48×48: 1.2e-5
        # of s₀ for the float32 Gram solver, whose bound is 1e-4; float32 BLAS kernels differ between CPUs)
        s = torch.linalg.svdvals(world.double())
        assert s[-r:].max() <= TOL[solver] * ref.norm(), (solver, shape, r)
        assert s[min(m, n) - r - 1] > 1e-3 * s[0]


def test_dropped_energy_is_the_tail():
    w = decaying_spectrum(40, 80)
    s = torch.linalg.svdvals(w.double())
    for solver in ("svd", "gram"):
        tail = tail_factors(w, 5, solver)
        assert tail.tail_energy == pytest.approx((s[-5:].square().sum() / s.square().sum()).item(), rel=1e-4)


@pytest.mark.parametrize("solver", ["svd", "gram"])
def test_real_pretrained_weights(solver):
    """MiniLM's query (384×384) and FFN (1536×384) weights at r = 16 and r = k − 1."""
    from safetensors.torch import load_file

    state = load_file(str(embedded_model_dir() / "model.safetensors"))
    for key in ("encoder.layer.0.attention.self.query.weight", "encoder.layer.0.intermediate.dense.weight"):
        w = state[key]
        for r in (16, min(w.shape) - 1):
            assert rel_err(truncate_weight(w, r, solver)[0], reference_world(w, r)) <= TOL[solver], (key, r)


def test_bfloat16_weight_is_truncated_in_float32():
    w = decaying_spectrum(64, 32).bfloat16()
    world, _ = truncate_weight(w, 4, "gram")
    assert world.dtype == torch.bfloat16
    ref = reference_world(w.float(), 4)
    assert rel_err(world.float(), ref) <= 4e-3  # bf16 storage: 8 mantissa bits ≈ 2e-3 per element


@pytest.mark.parametrize("r", [0, -1, 40, 41])
def test_bad_rank_names_layer_and_shape(r):
    with pytest.raises(ValueError, match=r"q_proj of shape 40×80.*min\(m, n\) = 40"):
        check_rank(r, (40, 80), "q_proj")
