"""Plain-torch reference of the linear layer with an INT8 weight and 16-bit activations.

The weight is the INT8 format of docs/internals.md (``q: int8 [out, in]``, fp32 ``scale`` and
``zero`` per group of the row-major flattening). It is dequantized in fp32, rounded once to the
activation dtype, and the matmul runs in the activation dtype, as the Triton kernel does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._groups import check_floating, check_group_size, check_stats
from .int8_ref import dequantize_int8_ref

__all__ = ["check_w8a16", "w8a16_linear_ref", "w8a16_grad_input_ref"]


def check_w8a16(
    name: str, a: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, dim: int
) -> None:
    """Arguments of a W8A16 matmul, checked once by the public entry points of qgl.kernels (the
    references below and the Triton wrappers trust them): a floating activation ``a`` named
    ``name`` whose last dim equals ``q.shape[dim]``, a 2-D int8 ``q``, fp32 stats per group."""
    check_group_size(group_size)
    check_floating(name, a)
    if q.dtype != torch.int8 or q.dim() != 2:
        raise ValueError(f"q must be a 2-D int8 (out, in) weight, got {q.dtype} {tuple(q.shape)}")
    if a.shape[-1] != q.shape[dim]:
        what = "in-features" if dim == 1 else "out-features"
        raise ValueError(f"{name}'s last dim {a.shape[-1]} must equal the weight's {what} {q.shape[dim]}")
    check_stats(q.numel(), group_size, scale, zero)


def w8a16_linear_ref(
    x: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ dequant(W)^T + bias``: ``x [..., in]`` (floating), ``q int8 [out, in]`` -> ``[..., out]``.

    The result and the matmul are in ``x.dtype``; ``bias [out]`` is cast to ``x.dtype``.
    """
    w = dequantize_int8_ref(q, scale, zero, group_size, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def w8a16_grad_input_ref(
    dy: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int
) -> Tensor:
    """``dy @ dequant(W)``: ``dy [..., out]`` (floating), ``q int8 [out, in]`` -> ``dx [..., in]``.

    The result and the matmul are in ``dy.dtype``.
    """
    return dy @ dequantize_int8_ref(q, scale, zero, group_size, dy.dtype)
