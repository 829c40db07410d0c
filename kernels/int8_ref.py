"""Plain-torch reference of the group-wise INT8 weight format (docs/internals.md, "INT8 weight").

Tensors: ``q: int8 [*shape]``, ``scale: fp32 [n_groups]``, ``zero: fp32 [n_groups]`` or ``None``
(symmetric), groups of ``group_size`` consecutive elements of the row-major flattening, the last
one possibly short. All arithmetic is fp32 whatever the dtype of the floating input, because a
bf16 computation loses updates smaller than half a bf16 ulp and biases stochastic rounding.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._groups import (
    check_dtype,
    check_float_dtype,
    check_floating,
    check_group_size,
    check_stats,
    dequantize_groups_,
    group_views,
    n_groups,
)

__all__ = [
    "check_quantize_int8",
    "check_dequantize_int8",
    "check_int8_update",
    "check_device_scalars",
    "host_scalars",
    "quantize_int8_ref",
    "dequantize_int8_ref",
    "int8_update_ref",
    "stochastic_round_ref",
]

_SYM_RANGE = (-127, 127)  # symmetric: -128 unused so that the grid is symmetric around 0
_ASYM_RANGE = (-128, 127)


# --- argument checks: run once, by the public entry points of qgl.kernels --------------------------
# The references below and the Triton wrappers (int8_triton.py) take checked arguments: called
# directly, they trust their caller.


def check_quantize_int8(w: Tensor, group_size: int) -> None:
    """Raise on a bad ``group_size`` or a non-floating ``w``."""
    check_group_size(group_size)
    check_floating("w", w)


def check_dequantize_int8(
    q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, dtype: torch.dtype
) -> None:
    """Raise on a bad ``group_size``, a non-int8 ``q``, stats of the wrong dtype or length, or a
    non-floating ``dtype``."""
    check_group_size(group_size)
    check_dtype("q", q, torch.int8)
    check_stats(q.numel(), group_size, scale, zero)
    check_float_dtype(dtype)


def check_int8_update(q: Tensor, scale: Tensor, zero: Tensor | None, delta: Tensor, group_size: int) -> None:
    """As ``check_dequantize_int8``, and ``delta`` floating of ``q``'s shape, ``q`` contiguous."""
    check_group_size(group_size)
    check_dtype("q", q, torch.int8)
    check_stats(q.numel(), group_size, scale, zero)
    check_floating("delta", delta)
    if delta.shape != q.shape:
        raise ValueError(f"delta must have q's shape {tuple(q.shape)}, got {tuple(delta.shape)}")
    if not q.is_contiguous():
        raise ValueError("q must be contiguous: it is updated in place through a flat view")


def check_device_scalars(q: Tensor, decay: object, seed: object, step: Tensor) -> None:
    """``int8_update_``'s device scalars: ``step`` int32/int64 with one element and ``decay`` fp32 with
    one element, both on ``q``'s device; ``seed`` an int in ``[0, 2**62)``."""
    if not isinstance(step, Tensor) or step.dtype not in (torch.int32, torch.int64) or step.numel() != 1:
        raise ValueError(f"step must be an int32/int64 tensor of one element, got {step!r}")
    if not isinstance(decay, Tensor) or decay.dtype != torch.float32 or decay.numel() != 1:
        raise ValueError(f"with a device step, decay must be an fp32 tensor of one element, got {decay!r}")
    if step.device != q.device or decay.device != q.device:
        raise ValueError(f"step and decay must be on q's device {q.device}, "
                         f"got {step.device} and {decay.device}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
        raise ValueError(f"with a device step, seed must be an int in [0, 2**62), got {seed!r}")


def host_scalars(decay: float | Tensor, seed: int, step: Tensor) -> tuple[float, int]:
    """``int8_update_``'s device scalars as the host numbers they stand for: ``(float(decay), (seed +
    step) mod 2**62)`` (a sync: for the references, never inside a CUDA graph)."""
    return float(decay), (int(seed) + int(step)) % 2**62


def _group_stats(x: Tensor, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero) of each row of fp32 ``x [groups, size]`` by the formulas of the format."""
    mn, mx = torch.aminmax(x, dim=1)
    if symmetric:
        scale = torch.maximum(mn.neg(), mx).div_(127.0)
        return scale.masked_fill_(scale == 0, 1.0), None
    scale = (mx - mn).div_(255.0).masked_fill_(mx == mn, 1.0)
    # zero stays fp32, unrounded and unclamped: a group of one sign is then never clipped.
    zero = torch.div(mn, scale).neg_().sub_(128.0)
    return scale, zero


def _to_grid_(x: Tensor, scale: Tensor, zero: Tensor | None) -> Tensor:
    """In place: ``x / scale + zero`` per row; returns ``x``."""
    x.div_(scale[:, None])
    if zero is not None:
        x.add_(zero[:, None])
    return x


def quantize_int8_ref(
    w: Tensor, group_size: int = 256, symmetric: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Quantize ``w`` (any floating dtype, any shape) to the INT8 format with round-to-nearest.

    Returns ``(q int8 [*w.shape], scale fp32 [n_groups], zero fp32 [n_groups] or None)``; ``zero``
    is None iff ``symmetric``. Computes in fp32. Non-finite values in ``w`` give non-finite
    scales: finite inputs are the caller's responsibility.
    """
    q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
    g = n_groups(w.numel(), group_size)
    scale = torch.empty(g, dtype=torch.float32, device=w.device)
    zero = None if symmetric else torch.empty(g, dtype=torch.float32, device=w.device)
    lo, hi = _SYM_RANGE if symmetric else _ASYM_RANGE
    w_parts = group_views(w.reshape(-1), group_size)
    q_parts = group_views(q.view(-1), group_size)
    for (x, groups), (q_part, _) in zip(w_parts, q_parts, strict=True):
        x = x.to(torch.float32, copy=True)  # a copy: the grid transform below is in place
        s, z = _group_stats(x, symmetric)
        scale[groups].copy_(s)
        if zero is not None:
            zero[groups].copy_(z)
        q_part.copy_(_to_grid_(x, s, z).round_().clamp_(lo, hi))
    return q, scale, zero


def dequantize_int8_ref(
    q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(q - zero) * scale`` (``q * scale`` if ``zero`` is None) in fp32, returned in ``dtype``.

    ``q: int8 [*shape]``, ``scale``/``zero``: fp32 ``[n_groups]``; result ``dtype [*shape]``.
    """
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    dequantize_groups_(q.reshape(-1), scale, zero, group_size, out.view(-1))
    return out


def stochastic_round_ref(x: Tensor, seed: int, lo: int, hi: int) -> Tensor:
    """``clamp(floor(x + u), lo, hi)`` with ``u ~ U[0, 1)`` fp32, so ``E[result] = x`` inside the range.

    ``x``: fp32, any shape; returns a new fp32 tensor of integral values. ``u`` comes from
    ``torch.Generator(device=x.device).manual_seed(seed)`` in row-major order: the same seed gives
    the same bits on the same device.
    """
    check_dtype("x", x, torch.float32)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=torch.float32)
    return u.add_(x).floor_().clamp_(lo, hi)


def int8_update_ref(
    q: Tensor, scale: Tensor, zero: Tensor | None, delta: Tensor, decay: float, group_size: int, seed: int
) -> None:
    """In place: ``w' = decay * dequant(q) + delta``; new scale/zero from ``w'``; ``q' = SR(w'/scale+zero)``.

    Operation order (each step rounded to fp32; a kernel mirroring it matches bit for bit up to the
    random draw; ``decay`` is taken as fp32): ``w' = ((q - zero) * scale) * decay + delta``, then
    per group the scale/zero formulas of :func:`quantize_int8_ref`, then ``x = w' / scale + zero``.

    ``q``: contiguous int8 ``[*shape]``; ``scale``/``zero``: fp32 ``[n_groups]`` (``zero`` None
    means symmetric, and the update stays symmetric); ``delta``: floating ``[*shape]`` (fp32
    expected; other dtypes are widened to fp32 element by element). All three of ``q``, ``scale``
    and ``zero`` are overwritten. Uses two fp32 temporaries of ``q``'s size (``w'`` and the
    uniforms). Non-finite values in ``delta`` are the caller's problem: they make the group's scale
    non-finite and its codes meaningless.
    """
    symmetric = zero is None
    w = dequantize_int8_ref(q, scale, zero, group_size, torch.float32).view(-1)
    if decay != 1.0:
        w.mul_(decay)
    w.add_(delta.reshape(-1))
    for x, groups in group_views(w, group_size):
        s, z = _group_stats(x, symmetric)
        _to_grid_(x, s, z)
        scale[groups].copy_(s)
        if zero is not None:
            zero[groups].copy_(z)
    lo, hi = _SYM_RANGE if symmetric else _ASYM_RANGE
    q.view(-1).copy_(stochastic_round_ref(w, seed, lo, hi))
