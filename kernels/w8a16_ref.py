"""Plain-torch reference of the linear layer with an INT8 weight and 16-bit activations.

The weight is the INT8 format of docs/internals.md (``q: int8 [out, in]``, fp32 ``scale`` and
``zero`` per group of the row-major flattening). It is dequantized in fp32, rounded once to the
activation dtype, and the matmul runs in the activation dtype, as the Triton kernel does.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ._groups import check_floating
from .int8_ref import dequantize_int8_ref

__all__ = ["w8a16_linear_ref", "w8a16_grad_input_ref"]


def _check_weight(q: Tensor) -> None:
    if q.dim() != 2:
        raise ValueError(f"q must be a 2-D (out, in) weight, got shape {tuple(q.shape)}")


def w8a16_linear_ref(
    x: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ dequant(W)^T + bias``: ``x [..., in]`` (floating), ``q int8 [out, in]`` -> ``[..., out]``.

    The result and the matmul are in ``x.dtype``; ``bias [out]`` is cast to ``x.dtype``.
    """
    check_floating("x", x)
    _check_weight(q)
    if x.shape[-1] != q.shape[1]:
        raise ValueError(f"x's last dim {x.shape[-1]} must equal the weight's in-features {q.shape[1]}")
    w = dequantize_int8_ref(q, scale, zero, group_size, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def w8a16_grad_input_ref(
    dy: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int
) -> Tensor:
    """``dy @ dequant(W)``: ``dy [..., out]`` (floating), ``q int8 [out, in]`` -> ``dx [..., in]``.

    The result and the matmul are in ``dy.dtype``.
    """
    check_floating("dy", dy)
    _check_weight(q)
    if dy.shape[-1] != q.shape[0]:
        raise ValueError(f"dy's last dim {dy.shape[-1]} must equal the weight's out-features {q.shape[0]}")
    return dy @ dequantize_int8_ref(q, scale, zero, group_size, dy.dtype)
