"""``Int8Tensor``: a group-quantized INT8 weight (docs/internals.md, "INT8 weight").

A thin container over the ``qgl.kernels`` INT8 functions: it holds ``q: int8 [*shape]``,
``scale: fp32 [n_groups]``, ``zero: fp32 [n_groups]`` or None (symmetric) and ``group_size``, and
keeps them consistent. The math lives in the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from qgl.kernels import dequantize_int8, int8_update_, quantize_int8
from qgl.kernels._groups import check_dtype, check_group_size, check_stats

__all__ = ["Int8Tensor"]


@dataclass(eq=False, repr=False)
class Int8Tensor:
    """INT8 weight: ``w ~= q * scale`` (symmetric, ``zero`` None) or ``(q - zero) * scale``.

    Fields: ``q`` int8 ``[*shape]``, ``scale`` fp32 ``[n_groups]``, ``zero`` fp32 ``[n_groups]``
    or None, ``group_size`` (groups of consecutive row-major elements, the last possibly short).
    """

    q: Tensor
    scale: Tensor
    zero: Tensor | None
    group_size: int = 256

    def __post_init__(self) -> None:
        check_group_size(self.group_size)
        check_dtype("q", self.q, torch.int8)
        check_stats(self.q.numel(), self.group_size, self.scale, self.zero)

    @classmethod
    def from_float(cls, w: Tensor, group_size: int = 256, symmetric: bool = True) -> Int8Tensor:
        """Quantize a floating ``w`` (any shape and dtype; math in fp32) with round-to-nearest."""
        q, scale, zero = quantize_int8(w, group_size, symmetric)
        return cls(q, scale, zero, group_size)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def nbytes(self) -> int:
        """Bytes held by ``q``, ``scale`` and ``zero``."""
        return sum(t.numel() * t.element_size() for t in (self.q, self.scale, self.zero) if t is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight as ``dtype [*shape]`` (computed in fp32, rounded once to ``dtype``)."""
        return dequantize_int8(self.q, self.scale, self.zero, self.group_size, dtype)

    def add_(self, delta: Tensor, decay: float = 1.0, seed: int = 0) -> Int8Tensor:
        """In place ``W <- SR(decay * W + delta)`` with stochastic rounding keyed by ``seed``; returns self.

        ``delta``: fp32 ``[*shape]``. Scales (and zeros) are recomputed from the updated values.
        """
        int8_update_(self.q, self.scale, self.zero, delta, decay, self.group_size, seed)
        return self

    def __repr__(self) -> str:
        mode = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"Int8Tensor(shape={tuple(self.shape)}, group_size={self.group_size}, {mode}, "
            f"device={self.device})"
        )
