"""``Int8Tensor``: a group-quantized INT8 weight (docs/internals.md, "INT8 weight"), the storage type
that INT8 weight updates go through.

A thin container over the ``qgl.kernels`` INT8 functions: it holds ``q: int8 [*shape]``,
``scale: fp32 [n_groups]``, ``zero: fp32 [n_groups]`` or None (symmetric) and ``group_size``, and
keeps them consistent. The math lives in the kernels.

``qgl.nn.QLinear`` keeps its weight in three module buffers (so that ``state_dict``, ``.to()`` and
checkpoints see them as usual) and exposes them as an ``Int8Tensor`` *view* (``Int8Tensor.view_of``)
attached to its gradient-carrier Parameter with ``attach_storage``; the optimizer finds it with
``storage_of(param)`` and updates it with ``add_``. Nothing else links a parameter to its INT8 weight.
"""

from __future__ import annotations

from collections.abc import MutableMapping

import torch
from torch import Tensor

from qgl.kernels import dequantize_int8, int8_update_, quantize_int8
from qgl.kernels._groups import check_dtype, check_group_size, check_stats

__all__ = ["Int8Tensor", "attach_storage", "storage_of"]

_FIELDS = ("q", "scale", "zero")
_ATTR = "_qgl_int8_storage"  # the attribute of a carrier Parameter that holds its Int8Tensor


class Int8Tensor:
    """INT8 weight: ``w ~= q * scale`` (symmetric, ``zero`` None) or ``(q - zero) * scale``.

    Fields: ``q`` int8 ``[*shape]``, ``scale`` fp32 ``[n_groups]``, ``zero`` fp32 ``[n_groups]``
    or None, ``group_size`` (groups of consecutive row-major elements, the last possibly short).
    Each field is read from a mapping at every use (its own, or a module's buffers: ``view_of``).
    """

    __slots__ = ("_tensors", "_keys", "group_size")

    def __init__(self, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int = 256) -> None:
        check_group_size(group_size)
        check_dtype("q", q, torch.int8)
        check_stats(q.numel(), group_size, scale, zero)
        self._tensors: MutableMapping[str, Tensor | None] = {"q": q, "scale": scale, "zero": zero}
        self._keys = _FIELDS
        self.group_size = group_size

    @classmethod
    def view_of(
        cls, tensors: MutableMapping[str, Tensor | None], keys: tuple[str, str, str], group_size: int
    ) -> Int8Tensor:
        """The storage whose ``q``, ``scale``, ``zero`` are ``tensors[keys[0..2]]``, looked up at each use.

        For ``nn.Module`` buffers (``module._buffers``): whoever replaces a buffer (``.to()``,
        ``load_state_dict(assign=True)``, plain assignment) is seen at the next update; no copy.
        """
        t = cls.__new__(cls)
        t._tensors, t._keys, t.group_size = tensors, keys, group_size
        return t

    @classmethod
    def from_float(cls, w: Tensor, group_size: int = 256, symmetric: bool = True) -> Int8Tensor:
        """Quantize a floating ``w`` (any shape and dtype; math in fp32) with round-to-nearest."""
        q, scale, zero = quantize_int8(w, group_size, symmetric)
        return cls(q, scale, zero, group_size)

    @property
    def q(self) -> Tensor:
        return self._tensors[self._keys[0]]  # type: ignore[return-value]

    @property
    def scale(self) -> Tensor:
        return self._tensors[self._keys[1]]  # type: ignore[return-value]

    @property
    def zero(self) -> Tensor | None:
        return self._tensors[self._keys[2]]

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

    def set_(self, w: Tensor) -> None:
        """Quantize floating ``w [*shape]`` (round-to-nearest) into the existing tensors, in place."""
        q, scale, zero = quantize_int8(w, self.group_size, self.symmetric)
        self.q.copy_(q)
        self.scale.copy_(scale)
        if zero is not None:
            self.zero.copy_(zero)  # type: ignore[union-attr]

    def add_(
        self, delta: Tensor, decay: float | Tensor = 1.0, seed: int | None = 0, step: Tensor | None = None
    ) -> Int8Tensor:
        """In place ``W <- SR(decay * W + delta)``, stochastic rounding keyed by ``seed``; returns self.

        ``delta``: floating ``[*shape]`` (fp32 or 16-bit; added in fp32). Scales (and zeros) are
        recomputed from the updated values. ``seed=None``: round to nearest instead, which drops every
        update smaller than half a step (the ablation that shows why stochastic rounding exists).
        ``step``: a one-element int tensor on the weight's device; the key is then ``(seed + step) mod
        2**62`` and ``decay`` a one-element fp32 tensor, read when the kernel runs (``int8_update_``).
        """
        q, scale, zero = self.q, self.scale, self.zero
        if step is not None and seed is None:
            raise ValueError("a device step keys the stochastic rounding: it needs a seed")
        if seed is not None:  # the arguments are checked once, by the kernel's entry point
            host_decay = step is None  # a device step reads decay from its tensor
            int8_update_(q, scale, zero, delta, float(decay) if host_decay else decay, self.group_size,
                         int(seed), step)
            return self
        if tuple(delta.shape) != tuple(q.shape):
            raise ValueError(f"delta must have the weight's shape {tuple(q.shape)}, got {tuple(delta.shape)}")
        self.set_(self.dequantize(torch.float32).mul_(float(decay)).add_(delta))
        return self

    def __repr__(self) -> str:
        mode = "symmetric" if self.symmetric else "asymmetric"
        return (
            f"Int8Tensor(shape={tuple(self.shape)}, group_size={self.group_size}, {mode}, "
            f"device={self.device})"
        )


def attach_storage(param: Tensor, storage: Int8Tensor) -> None:
    """Declare ``storage`` the weight that updates of ``param`` (a gradient carrier) go to."""
    setattr(param, _ATTR, storage)


def storage_of(param: Tensor) -> Int8Tensor | None:
    """The ``Int8Tensor`` attached to ``param`` by ``attach_storage``, or None (a float weight)."""
    return getattr(param, _ATTR, None)
