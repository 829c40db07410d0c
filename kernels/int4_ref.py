"""Plain-torch reference of the packed INT4 projection format (docs/internals.md, "INT4 projection").

Tensors: ``packed: uint8 [ceil(numel / 2)]`` (byte ``k`` = element ``2k`` in the low nibble,
``2k + 1`` in the high nibble, an odd count pads the last high nibble with 0), ``scale`` and
``zero``: fp32 ``[n_groups]``, asymmetric per group of ``group_size`` row-major elements:
``p ~= (q - zero) * scale`` with ``q`` in 0..15. The projection matmuls dequantize P to fp32 and
compute and return fp32 whatever the gradient's dtype: the optimizer's moments live in fp32 math.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ._groups import (
    check_dtype,
    check_float_dtype,
    check_floating,
    check_group_size,
    check_packed,
    check_projection,
    check_shape,
    check_stats,
    dequantize_groups_,
    group_views,
    n_groups,
)

__all__ = [
    "check_pack_int4",
    "check_quantize_int4",
    "check_dequantize_int4",
    "check_int4_projection",
    "quantize_int4_ref",
    "dequantize_int4_ref",
    "pack_int4_ref",
    "unpack_int4_ref",
    "int4_project_ref",
    "int4_project_back_ref",
]


# --- argument checks: run once, by the public entry points of qgl.kernels --------------------------
# The references below and the Triton wrappers (int4_format_triton.py, int4_triton.py) take checked
# arguments: called directly, they trust their caller.


def check_pack_int4(q: Tensor) -> None:
    """``q`` uint8 codes in 0..15 (the range check reads ``q.max()``: one device sync)."""
    check_dtype("q", q, torch.uint8)
    if q.numel() and int(q.max()) > 15:
        raise ValueError(f"q must hold 4-bit codes 0..15, found {int(q.max())}")


def check_quantize_int4(p: Tensor, group_size: int) -> None:
    """A valid ``group_size`` and a floating ``p``."""
    check_group_size(group_size)
    check_floating("p", p)


def check_dequantize_int4(
    packed: Tensor, scale: Tensor, zero: Tensor, shape: Sequence[int], group_size: int, dtype: torch.dtype
) -> tuple[int, ...]:
    """Packed codes of ``shape``, fp32 scale and zero per group, a floating ``dtype``; returns the dims."""
    check_group_size(group_size)
    check_float_dtype(dtype)
    dims = check_shape(shape)
    numel = math.prod(dims)
    if zero is None:
        raise TypeError("zero must be an fp32 tensor: the INT4 format is asymmetric")
    check_stats(numel, group_size, scale, zero)
    check_packed(packed, numel)
    return dims


def check_int4_projection(
    x: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, p_shape: Sequence[int], group_size: int,
    side: str | None, back: bool,
) -> tuple[int, int]:
    """A floating ``x`` (``g``, or ``low`` when ``back``) and a 2-D packed P whose shape fits ``x``
    on ``side`` (None: not checked); returns P's dims."""
    check_floating("low" if back else "g", x)
    dims = check_shape(p_shape)
    if len(dims) != 2:
        raise ValueError(f"p_shape must be 2-D, got {dims}")
    check_dequantize_int4(packed, scale, zero, dims, group_size, torch.float32)
    if side is not None:
        check_projection(side, x, dims, back=back)  # type: ignore[arg-type]
    return dims  # type: ignore[return-value]


def pack_int4_ref(q: Tensor) -> Tensor:
    """Pack ``q: uint8`` codes in 0..15 (any shape, row-major) into ``uint8 [ceil(numel / 2)]``."""
    flat = q.reshape(-1)
    numel = flat.numel()
    half = numel // 2
    packed = torch.empty(half + numel % 2, dtype=torch.uint8, device=q.device)
    pairs = flat[: 2 * half].view(half, 2)
    torch.bitwise_or(pairs[:, 0], pairs[:, 1] << 4, out=packed[:half])
    if numel % 2:
        packed[half] = flat[-1]
    return packed


def unpack_int4_ref(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_int4_ref`: ``packed uint8 [ceil(numel / 2)]`` -> ``uint8 [numel]``."""
    half = numel // 2
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    pairs = out[: 2 * half].view(half, 2)
    pairs[:, 0].copy_(packed[:half] & 15)
    pairs[:, 1].copy_(packed[:half] >> 4)
    if numel % 2:
        out[-1] = packed[half] & 15
    return out


def quantize_int4_ref(p: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize ``p`` (any floating dtype, any shape) to packed INT4 with round-to-nearest.

    Returns ``(packed uint8 [ceil(numel / 2)], scale fp32 [n_groups], zero fp32 [n_groups])``;
    the shape is the caller's to keep. Computes in fp32; non-finite inputs are the caller's problem.
    """
    g = n_groups(p.numel(), group_size)
    scale = torch.empty(g, dtype=torch.float32, device=p.device)
    zero = torch.empty(g, dtype=torch.float32, device=p.device)
    codes = torch.empty(p.numel(), dtype=torch.uint8, device=p.device)
    p_parts = group_views(p.reshape(-1), group_size)
    c_parts = group_views(codes, group_size)
    for (x, groups), (c, _) in zip(p_parts, c_parts, strict=True):
        x = x.to(torch.float32, copy=True)  # a copy: transformed in place below
        mn, mx = torch.aminmax(x, dim=1)
        s = (mx - mn).div_(15.0).masked_fill_(mx == mn, 1.0)
        z = torch.div(mn, s).neg_()
        scale[groups].copy_(s)
        zero[groups].copy_(z)
        c.copy_(x.div_(s[:, None]).add_(z[:, None]).round_().clamp_(0, 15))
    return pack_int4_ref(codes), scale, zero


def dequantize_int4_ref(
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    shape: Sequence[int],
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(q - zero) * scale`` in fp32 from the packed codes, returned as ``dtype [*shape]``."""
    dims = tuple(shape)
    numel = math.prod(dims)
    codes = unpack_int4_ref(packed, numel)
    out = torch.empty(dims, dtype=dtype, device=packed.device)
    dequantize_groups_(codes, scale, zero, group_size, out.view(-1))
    return out


def _dequantize_p(packed, scale, zero, p_shape, group_size) -> Tensor:
    return dequantize_int4_ref(packed, scale, zero, tuple(p_shape), group_size, torch.float32)


def int4_project_ref(
    g: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, p_shape: Sequence[int], group_size: int, side: str
) -> Tensor:
    """Project ``g [m, n]`` into the subspace of the packed P; fp32 result.

    ``side="right"``: P is ``(r, n)``, returns ``g @ P^T`` of shape ``(m, r)``.
    ``side="left"``: P is ``(m, r)``, returns ``P^T @ g`` of shape ``(r, n)``.
    """
    p = _dequantize_p(packed, scale, zero, p_shape, group_size)
    g32 = g.to(torch.float32)
    return g32 @ p.T if side == "right" else p.T @ g32


def int4_project_back_ref(
    low: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    p_shape: Sequence[int],
    group_size: int,
    side: str,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Map a low-rank ``low`` back to the full space through the packed P; ``(m, n)`` result,
    computed in fp32 and rounded once to ``out_dtype`` (a floating dtype).

    ``side="right"``: ``low (m, r) @ P (r, n)``. ``side="left"``: ``P (m, r) @ low (r, n)``.
    """
    p = _dequantize_p(packed, scale, zero, p_shape, group_size)
    low32 = low.to(torch.float32)
    return (low32 @ p if side == "right" else p @ low32).to(out_dtype)
