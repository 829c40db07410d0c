"""top_singular_vectors: shapes, sides, sign convention, randomized accuracy, errors."""

import pytest
import torch

from qgl.optim.svd import top_singular_vectors


def _low_rank_plus_noise(m: int, n: int, true_rank: int, noise: float) -> torch.Tensor:
    """A matrix with `true_rank` well-separated singular values (10 .. 1) plus Gaussian noise."""
    u = torch.linalg.qr(torch.randn(m, true_rank)).Q
    v = torch.linalg.qr(torch.randn(n, true_rank)).Q
    s = torch.linspace(10.0, 1.0, true_rank)
    return u @ torch.diag(s) @ v.T + noise * torch.randn(m, n)


def _power_law(m: int, n: int, decay: float) -> torch.Tensor:
    """No exact low rank: singular values k^-decay, closer to what a training gradient looks like."""
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k)).Q
    v = torch.linalg.qr(torch.randn(n, k)).Q
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -decay
    return u @ torch.diag(s) @ v.T


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """||A B^T||_F^2 / r for two (r, n) orthonormal row bases: 1 iff they span the same subspace
    (the mean squared cosine of the principal angles)."""
    return ((a @ b.T).norm() ** 2 / a.shape[0]).item()


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["full", "randomized"])
def test_shapes_orthonormal_fp32(side, method):
    g = torch.randn(48, 20, dtype=torch.bfloat16)
    p = top_singular_vectors(g, 5, side, method)
    assert p.dtype == torch.float32
    if side == "right":
        assert p.shape == (5, 20)
        gram = p @ p.T
    else:
        assert p.shape == (48, 5)
        gram = p.T @ p
    torch.testing.assert_close(gram, torch.eye(5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_full_matches_linalg_svd_up_to_sign_and_sign_convention(side):
    g = torch.randn(30, 17)
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    p = top_singular_vectors(g, 4, side)
    vectors = p if side == "right" else p.T  # (4, k): one vector a row
    ref = vh[:4] if side == "right" else u[:, :4].T
    torch.testing.assert_close(vectors.abs(), ref.abs(), atol=1e-5, rtol=0)
    # Sign convention: each vector's largest-magnitude entry is positive.
    lead = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    assert (lead > 0).all()
    # Flipping the input's sign (which flips U or V) gives the same vectors.
    torch.testing.assert_close(top_singular_vectors(-g, 4, side), p, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("true_rank", "bound"), [(16, 0.99999), (32, 0.995)])
def test_randomized_accuracy_low_rank_plus_noise(true_rank, bound):
    # true_rank 16: the cut at rank 16 falls in the gap down to the noise (the easy, GaLore-like
    # case); true_rank 32: the cut falls between s_16 and s_17 ~= 0.95 s_16 (the hard case).
    g = _low_rank_plus_noise(512, 256, true_rank=true_rank, noise=1e-3)
    rank = 16
    full = top_singular_vectors(g, rank, "right", "full")
    gen = torch.Generator().manual_seed(0)
    rand = top_singular_vectors(g, rank, "right", "randomized", generator=gen)
    overlap = _overlap(rand, full)
    print(f"randomized vs full overlap (512x256, rank 16 of {true_rank} + noise 1e-3): {overlap:.7f}")
    assert overlap > bound, f"subspace overlap {overlap:.7f}"
    # The leading vectors, well separated, match individually, signs included.
    cos = (rand[:4] * full[:4]).sum(dim=1)
    assert cos.min() > 0.999, f"per-vector cos {cos.tolist()}"


@pytest.mark.parametrize("side", ["right", "left"])
def test_randomized_accuracy_power_law_spectrum(side):
    # A harder, gradient-like spectrum without a gap: power iterations carry the accuracy.
    g = _power_law(256, 192, decay=1.0)
    g = g if side == "right" else g.T
    rank = 16
    full = top_singular_vectors(g, rank, side, "full")
    gen = torch.Generator().manual_seed(0)
    rand = top_singular_vectors(g, rank, side, "randomized", generator=gen)
    if side == "left":
        full, rand = full.T, rand.T
    overlap = _overlap(rand, full)
    print(f"randomized vs full subspace overlap (power-law k^-1 spectrum, rank 16, {side}): {overlap:.4f}")
    assert overlap > 0.95, f"subspace overlap {overlap:.4f}"


def test_randomized_is_deterministic_with_a_generator():
    g = torch.randn(40, 30)
    a = top_singular_vectors(g, 3, "left", "randomized", generator=torch.Generator().manual_seed(7))
    b = top_singular_vectors(g, 3, "left", "randomized", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_rank_equal_to_min_dim():
    g = torch.randn(12, 7)
    p = top_singular_vectors(g, 7, "right", "randomized")
    torch.testing.assert_close(p.T @ p, torch.eye(7), atol=1e-5, rtol=0)  # square: a full basis


def test_errors():
    g = torch.randn(8, 6)
    with pytest.raises(ValueError, match=r"rank 7 is larger than the matrix \(8 x 6\)"):
        top_singular_vectors(g, 7, "right")
    with pytest.raises(ValueError, match="rank must be >= 1"):
        top_singular_vectors(g, 0, "right")
    with pytest.raises(ValueError, match="2-D"):
        top_singular_vectors(torch.randn(2, 3, 4), 1, "right")
    with pytest.raises(ValueError, match=r"unknown svd method 'qr'.*full.*randomized"):
        top_singular_vectors(g, 2, "right", method="qr")
    with pytest.raises(ValueError, match="unknown side"):
        top_singular_vectors(g, 2, "top")
