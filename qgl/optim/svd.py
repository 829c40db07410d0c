"""Leading singular vectors of a gradient, exact or randomized, always in fp32.

GaLore needs only the top-`rank` singular vectors of one side of a gradient G (m x n):

- side "right": `Vh[:rank]`, shape (rank, n), rows orthonormal;
- side "left":  `U[:, :rank]`, shape (m, rank), columns orthonormal.

`method="full"` is `torch.linalg.svd(full_matrices=False)` (O(m n min(m, n)));
`method="randomized"` is the Halko-Martinsson-Tropp range finder (Halko et al. 2011,
algorithms 4.4 and 5.1): a Gaussian sketch of `rank + oversample` columns, `power_iters`
subspace iterations re-orthonormalized by QR at each half-step (plain powers of G G^T lose
the small singular directions to round-off in fp32), then a Rayleigh-Ritz step: the
eigenvectors of the small (k x k) Gram matrix B B^T of the projected matrix B = Q^T G, formed
and solved in fp64 (where an SVD of the k x n matrix B would cost as much as the rest together
on a GPU). It costs O(m n k (2 power_iters + 2)) for k = rank + oversample.

Warm start (`init`): at a later refresh the previous basis is already close to the new one, so
the sketch starts from it (plus `oversample` Gaussian columns, which catch directions the old
basis lacks) instead of a Gaussian block. Subspace iteration shrinks the angle to the target by
about (s_{k+1} / s_rank)^2 per iteration; starting from a small angle, one iteration
(`WARM_POWER_ITERS`) reaches the accuracy that a cold start needs `POWER_ITERS` for
(tests/test_svd.py measures it on a drifting power-law spectrum).

Sign convention: singular vectors are defined up to sign, and LAPACK/cuSOLVER pick one
arbitrarily, so two SVDs of nearly the same matrix may return v and -v. Every returned
vector is flipped so that its largest-magnitude entry is positive. This keeps successive
bases comparable: GaLore carries its Adam moments, which live in the coordinates of P,
across refreshes, and a flipped basis vector would silently negate that coordinate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qgl.optim.settings import SVD_METHODS  # defined once, with the other choices

SIDES = ("right", "left")
OVERSAMPLE = 8  # extra sketch columns of the randomized method
POWER_ITERS = 2  # subspace iterations from a Gaussian sketch
WARM_POWER_ITERS = 1  # subspace iterations from the previous basis


def _check(g: Tensor, rank: int, side: str, method: str) -> None:
    if g.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got a tensor of shape {tuple(g.shape)}")
    m, n = g.shape
    if not 1 <= rank <= min(m, n):
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        raise ValueError(f"rank {rank} is larger than the matrix ({m} x {n})")
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; choose one of {SIDES}")
    if method not in SVD_METHODS:
        raise ValueError(f"unknown svd method {method!r}; choose one of {SVD_METHODS}")


def _fix_signs(cols: Tensor) -> Tensor:
    """Flip each column of `cols` (k x r) so that its largest-magnitude entry is positive."""
    idx = cols.abs().argmax(dim=0, keepdim=True)  # (1, r)
    signs = torch.gather(cols, 0, idx).sign()
    signs[signs == 0] = 1.0  # an all-zero column (G of rank < r) stays as it is
    return cols * signs


def _orth(x: Tensor) -> Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def _as_columns(basis: Tensor, side: str) -> Tensor:
    """A basis in `top_singular_vectors`' layout -> one vector a column."""
    return basis.T if side == "right" else basis


def _left_vectors_randomized(a: Tensor, rank: int, oversample: int, power_iters: int,
                             generator: torch.Generator | None, init: Tensor | None = None) -> Tensor:
    """Top-`rank` left singular vectors of `a` (p x q, fp32) by a randomized range finder,
    started from the columns of `init` (p x r0) when given."""
    p, q = a.shape
    k = min(rank + max(oversample, 0), min(p, q))
    if init is None:
        omega = torch.randn(q, k, dtype=a.dtype, device=a.device, generator=generator)
        basis = _orth(a @ omega)  # (p, k): approximate range of a
    else:
        start = init.to(device=a.device, dtype=a.dtype)[:, :k]
        extra = k - start.shape[1]
        if extra > 0:
            omega = torch.randn(q, extra, dtype=a.dtype, device=a.device, generator=generator)
            start = torch.cat([start, a @ omega], dim=1)
        basis = _orth(start)
    for _ in range(max(power_iters, 0)):
        basis = _orth(a @ _orth(a.T @ basis))
    # Rayleigh-Ritz: a ~= basis @ b with b = basis^T a (k x q); the top eigenvectors of b b^T
    # (k x k) rotate the basis onto a's leading left vectors. fp64 keeps the small eigenvalues
    # (s^2, which span twice the exponent range of s) from drowning in round-off.
    b = (basis.T @ a).double()
    _, vecs = torch.linalg.eigh(b @ b.T)  # ascending eigenvalues
    u_small = vecs.flip(-1)[:, :rank].to(a.dtype)
    return basis @ u_small


def top_singular_vectors(g: Tensor, rank: int, side: str, method: str = "full", oversample: int = OVERSAMPLE,
                         power_iters: int | None = None, generator: torch.Generator | None = None,
                         init: Tensor | None = None) -> Tensor:
    """The leading `rank` singular vectors of `g` on one side, in fp32, sign-normalized.

    Args:
        g: (m, n) matrix, any floating dtype; it is read in fp32 (the SVD of a bf16 gradient
            would be poorly conditioned and torch.linalg.svd does not take bf16).
        rank: 1 <= rank <= min(m, n).
        side: "right" -> returns Vh[:rank], (rank, n); "left" -> returns U[:, :rank], (m, rank).
        method: "full" (exact) or "randomized" (see the module docstring).
        oversample, power_iters: randomized only; extra sketch columns and subspace iterations
            (None: `POWER_ITERS` from a Gaussian sketch, `WARM_POWER_ITERS` from `init`).
        generator: randomized only; the source of the Gaussian sketch (must live on g's device).
        init: randomized only; a previous basis in the layout returned here ((r0, n) right,
            (m, r0) left, any r0 <= rank + oversample, need not be exactly orthonormal): the warm
            start. Ignored by "full".

    Returns:
        fp32 tensor on g's device with orthonormal rows ("right") or columns ("left"); each
        vector's largest-magnitude entry is positive.
    """
    _check(g, rank, side, method)
    a = g.detach().float()
    if side == "right":
        a = a.T  # right vectors of g are the left vectors of g^T: one code path for both
    if method == "full":
        cols = torch.linalg.svd(a, full_matrices=False).U[:, :rank]
    else:
        if init is not None:
            if init.dim() != 2 or _as_columns(init, side).shape[0] != a.shape[0]:
                raise ValueError(f"init of shape {tuple(init.shape)} does not fit a {side} basis of "
                                 f"a {tuple(g.shape)} matrix")
            init = _as_columns(init, side)
        iters = power_iters
        if iters is None:
            iters = POWER_ITERS if init is None else WARM_POWER_ITERS
        cols = _left_vectors_randomized(a, rank, oversample, iters, generator, init)
    cols = _fix_signs(cols)
    return cols.T.contiguous() if side == "right" else cols.contiguous()


def subspace_overlap(p_old: Tensor, p_new: Tensor, side: str) -> float:
    """Mean squared cosine of the principal angles between the spans of two bases, in [0, 1].

    `p_old`, `p_new`: bases in `top_singular_vectors`' layout ((r, n) right, (m, r) left; the
    ranks may differ, r is the smaller), in any float dtype and not necessarily orthonormal (an
    INT4-dequantized P is not): both are orthonormalized (QR, fp32) first. The result is
    ||Q_old^T Q_new||_F^2 / r: 1 for the same subspace, 0 for orthogonal ones, and the fraction
    of an isotropic vector of the smaller space that the other keeps. One host sync (`.item()`).
    """
    if side not in SIDES:
        raise ValueError(f"unknown side {side!r}; choose one of {SIDES}")
    a = _orth(_as_columns(p_old, side).float())
    b = _orth(_as_columns(p_new, side).to(device=a.device, dtype=torch.float32))
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"bases of different spaces: {tuple(p_old.shape)} and {tuple(p_new.shape)}")
    r = min(a.shape[1], b.shape[1])
    return float(((a.T @ b).norm() ** 2 / r).clamp(0.0, 1.0).item())
