"""``Int4Tensor``: a packed, group-wise asymmetric INT4 matrix (docs/internals.md, "INT4 projection").

Holds a GaLore projection P: ``packed: uint8 [ceil(numel / 2)]``, ``scale`` and ``zero``: fp32
``[n_groups]``, its ``shape`` and ``group_size``. The math lives in ``qgl.kernels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qgl.kernels import dequantize_int4, int4_dense_basis, int4_project, int4_project_back, quantize_int4
from qgl.kernels._groups import check_dtype, check_group_size, check_stats

__all__ = ["Int4Tensor"]


@dataclass(eq=False, repr=False)
class Int4Tensor:
    """INT4 matrix ``p ~= (q - zero) * scale``, codes 0..15 packed two to a byte (element 2k low).

    Fields: ``packed`` uint8 ``[ceil(numel / 2)]``, ``scale``/``zero`` fp32 ``[n_groups]``,
    ``shape`` (tuple of ints), ``group_size``.
    """

    packed: Tensor
    scale: Tensor
    zero: Tensor
    shape: tuple[int, ...]
    group_size: int = 256

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        check_group_size(self.group_size)
        check_dtype("packed", self.packed, torch.uint8)
        numel = math.prod(self.shape)
        if self.packed.dim() != 1 or self.packed.numel() != (numel + 1) // 2:
            raise ValueError(
                f"packed must be 1-D with {(numel + 1) // 2} bytes for shape {self.shape}, "
                f"got {tuple(self.packed.shape)}"
            )
        if self.zero is None:
            raise TypeError("zero must be an fp32 tensor: the INT4 format is asymmetric")
        check_stats(numel, self.group_size, self.scale, self.zero)

    @classmethod
    def from_float(cls, p: Tensor, group_size: int = 256) -> Int4Tensor:
        """Quantize a floating ``p`` (any shape and dtype; math in fp32) with round-to-nearest."""
        packed, scale, zero = quantize_int4(p, group_size)
        return cls(packed, scale, zero, tuple(p.shape), group_size)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes held by ``packed``, ``scale`` and ``zero``."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The matrix as ``dtype [*shape]`` (computed in fp32)."""
        return dequantize_int4(self.packed, self.scale, self.zero, self.shape, self.group_size, dtype)

    def project(self, g: Tensor, side: str) -> Tensor:
        """fp32 ``g @ P^T`` (``side="right"``, P ``(r, n)``) or ``P^T @ g`` (``"left"``, P ``(m, r)``)."""
        return int4_project(g, self.packed, self.scale, self.zero, self.shape, self.group_size, side)

    def project_back(self, low: Tensor, side: str, out_dtype: torch.dtype = torch.float32) -> Tensor:
        """``low @ P`` (``side="right"``) or ``P @ low`` (``"left"``), shape ``(m, n)``, accumulated
        in fp32 and returned in ``out_dtype``."""
        return int4_project_back(low, self.packed, self.scale, self.zero, self.shape, self.group_size, side,
                                 out_dtype)

    def dense_basis(self, like: Tensor) -> Tensor | None:
        """The bf16 matrix that `project` and `project_back` decode for a gradient like `like` and
        multiply with cuBLAS (the GPU's dense path), or None where they take another path
        (`qgl.kernels.int4_dense_basis`)."""
        return int4_dense_basis(self.packed, self.scale, self.zero, self.shape, self.group_size, like)

    def state_dict(self) -> dict[str, Any]:
        """Plain dict of tensors and ints, loadable by ``torch.load(weights_only=True)``."""
        return {
            "packed": self.packed,
            "scale": self.scale,
            "zero": self.zero,
            "shape": tuple(self.shape),
            "group_size": int(self.group_size),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Int4Tensor:
        """Inverse of :meth:`state_dict` (validates the tensors against shape and group size)."""
        missing = {"packed", "scale", "zero", "shape", "group_size"} - set(state)
        if missing:
            raise KeyError(f"Int4Tensor state is missing {sorted(missing)}")
        return cls(state["packed"], state["scale"], state["zero"], tuple(state["shape"]), state["group_size"])

    def __repr__(self) -> str:
        return f"Int4Tensor(shape={self.shape}, group_size={self.group_size}, device={self.device})"
