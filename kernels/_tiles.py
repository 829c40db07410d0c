"""Triton tile helpers shared by the W8A16 and INT4 matmul kernels (``w8a16_triton``, ``int4_triton``).

- ``swizzle``: grouped program order, so that neighbouring programs share tiles while in L2;
- ``group_scales``: per-element (scale, zero) of a tile of a group-quantized matrix whose groups
  (consecutive elements of the row-major flattening) may span rows.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["group_scales", "swizzle"]


@triton.jit
def swizzle(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """Grouped program order: GROUP_M row-tiles share each column tile while it is in L2."""
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def group_scales(s_ptr, z_ptr, rows, cols, col0, K, NK, C: tl.constexpr, GS: tl.constexpr,
                 SYMMETRIC: tl.constexpr):  # fmt: skip
    """Per-element ``(scale, zero)`` ``[R, C]`` of W at ``rows [R]`` x ``cols [C]``, ``NK`` = numel.

    A tile row covers C consecutive flat elements, hence at most ``(C - 1) // GS + 2`` groups:
    load those few ``[R]`` vectors and select per element. (A per-element gather would be
    software-pipelined into shared memory as an ``[R, C]`` fp32 buffer per stage: too large.)
    The wrappers send groups smaller than ``MIN_KERNEL_GROUP`` elsewhere, so that at most 9 vectors
    are loaded. Entries outside the tile's rows' span (wrapped or masked columns) get 0.
    """
    g0 = (rows * K + col0) // GS
    j = (rows[:, None] * K + cols[None, :]) // GS - g0[:, None]
    last = (NK - 1) // GS
    s = tl.zeros((rows.shape[0], C), dtype=tl.float32)
    z = tl.zeros((rows.shape[0], C), dtype=tl.float32)
    for t in tl.static_range((C - 1) // GS + 2):
        gt = tl.minimum(g0 + t, last)
        s = tl.where(j == t, tl.load(s_ptr + gt)[:, None], s)
        if not SYMMETRIC:
            z = tl.where(j == t, tl.load(z_ptr + gt)[:, None], z)
    return s, z
