"""Leading singular vectors of a gradient, exact or randomized, always in fp32.

GaLore needs only the top-`rank` singular vectors of one side of a gradient G (m x n):

- side "right": `Vh[:rank]`, shape (rank, n), rows orthonormal;
- side "left":  `U[:, :rank]`, shape (m, rank), columns orthonormal.

`method="full"` is `torch.linalg.svd(full_matrices=False)` (O(m n min(m, n)));
`method="randomized"` is the Halko-Martinsson-Tropp range finder (Halko et al. 2011,
algorithms 4.4 and 5.1): a Gaussian sketch of `rank + oversample` columns, `power_iters`
subspace iterations re-orthonormalized by QR at each half-step (plain powers of G G^T lose
the small singular directions to round-off in fp32), then an exact SVD of the small
projected matrix. It costs O(m n (rank + oversample) (2 power_iters + 2)).

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


def _left_vectors_randomized(a: Tensor, rank: int, oversample: int, power_iters: int,
                             generator: torch.Generator | None) -> Tensor:
    """Top-`rank` left singular vectors of `a` (p x q, fp32) by a randomized range finder."""
    p, q = a.shape
    k = min(rank + max(oversample, 0), min(p, q))
    omega = torch.randn(q, k, dtype=a.dtype, device=a.device, generator=generator)
    basis = _orth(a @ omega)  # (p, k): approximate range of a
    for _ in range(max(power_iters, 0)):
        basis = _orth(a @ _orth(a.T @ basis))
    # a ~= basis @ (basis^T a); the SVD of the small (k x q) factor gives a's left vectors.
    u_small = torch.linalg.svd(basis.T @ a, full_matrices=False).U  # (k, k)
    return basis @ u_small[:, :rank]


def top_singular_vectors(g: Tensor, rank: int, side: str, method: str = "full", oversample: int = 8,
                         power_iters: int = 2, generator: torch.Generator | None = None) -> Tensor:
    """The leading `rank` singular vectors of `g` on one side, in fp32, sign-normalized.

    Args:
        g: (m, n) matrix, any floating dtype; it is read in fp32 (the SVD of a bf16 gradient
            would be poorly conditioned and torch.linalg.svd does not take bf16).
        rank: 1 <= rank <= min(m, n).
        side: "right" -> returns Vh[:rank], (rank, n); "left" -> returns U[:, :rank], (m, rank).
        method: "full" (exact) or "randomized" (see the module docstring).
        oversample, power_iters: randomized only; extra sketch columns and subspace iterations.
        generator: randomized only; the source of the Gaussian sketch (must live on g's device).

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
        cols = _left_vectors_randomized(a, rank, oversample, power_iters, generator)
    cols = _fix_signs(cols)
    return cols.T.contiguous() if side == "right" else cols.contiguous()
