"""Group-wise layout helpers and argument checks shared by the plain-torch references.

A group-wise format groups a tensor flattened in row-major order into runs of ``group_size``
consecutive elements; only the last group may be short (docs/internals.md). Rather than padding
(a full copy), the references work on at most two views of the flat tensor: the full groups as a
``[n_full, group_size]`` matrix and the short tail as a ``[1, rem]`` matrix, each paired with the
slice of per-group statistics (scale, zero) that belongs to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "check_group_size",
    "n_groups",
    "group_views",
    "check_stats",
    "check_dtype",
    "check_floating",
    "check_float_dtype",
    "dequantize_groups_",
]


def check_group_size(group_size: int) -> int:
    """Return ``group_size`` if it is a positive int, else raise ValueError naming it."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    return group_size


def n_groups(numel: int, group_size: int) -> int:
    """Number of groups of ``group_size`` covering ``numel`` elements (ceil division)."""
    return -(-numel // group_size)


def group_views(flat: Tensor, group_size: int) -> list[tuple[Tensor, slice]]:
    """Split a 1-D tensor into 2-D views of its groups.

    Returns up to two ``(view, groups)`` pairs: the full groups as ``[n_full, group_size]`` and
    the short last group as ``[1, rem]``; ``groups`` slices the per-group statistics. The views
    share memory with ``flat`` (which must be 1-D and contiguous), so in-place writes land there.
    """
    numel = flat.numel()
    n_full, rem = divmod(numel, group_size)
    parts = []
    if n_full:
        parts.append((flat[: n_full * group_size].view(n_full, group_size), slice(0, n_full)))
    if rem:
        parts.append((flat[n_full * group_size :].view(1, rem), slice(n_full, n_full + 1)))
    return parts


def check_dtype(name: str, t: Tensor, *dtypes: torch.dtype) -> None:
    """Raise TypeError unless ``t`` is a tensor of one of ``dtypes``."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d) for d in dtypes)
        raise TypeError(f"{name} must have dtype {want}, got {t.dtype}")


def check_floating(name: str, t: Tensor) -> None:
    """Raise TypeError unless ``t`` is a floating-point tensor."""
    if not isinstance(t, Tensor) or not t.is_floating_point():
        got = t.dtype if isinstance(t, Tensor) else type(t).__name__
        raise TypeError(f"{name} must be a floating-point tensor, got {got}")


def check_float_dtype(dtype: torch.dtype) -> None:
    """Raise TypeError unless ``dtype`` is a floating-point torch.dtype (an output dtype)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def check_stats(numel: int, group_size: int, scale: Tensor, zero: Tensor | None) -> None:
    """Check that fp32 ``scale`` (and ``zero`` unless None) hold one value per group."""
    want = n_groups(numel, group_size)
    for name, t in (("scale", scale), ("zero", zero)):
        if t is None:
            continue
        check_dtype(name, t, torch.float32)
        if t.dim() != 1 or t.numel() != want:
            raise ValueError(
                f"{name} must be 1-D with one value per group ({want} for {numel} elements in groups "
                f"of {group_size}), got shape {tuple(t.shape)}"
            )


def dequantize_groups_(
    codes: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, out: Tensor
) -> Tensor:
    """Write ``(codes - zero) * scale`` per group (``codes * scale`` if ``zero`` is None) into ``out``.

    ``codes``: 1-D integer tensor; ``out``: 1-D contiguous floating tensor of the same length.
    The arithmetic is fp32; ``out`` of another dtype receives the fp32 result rounded once.
    Returns ``out``.
    """
    c_parts = group_views(codes, group_size)
    o_parts = group_views(out, group_size)
    for (c, groups), (o, _) in zip(c_parts, o_parts, strict=True):
        buf = o if out.dtype == torch.float32 else torch.empty(o.shape, dtype=torch.float32, device=o.device)
        buf.copy_(c)
        if zero is not None:
            buf.sub_(zero[groups, None])
        buf.mul_(scale[groups, None])
        if buf is not o:
            o.copy_(buf)
    return out


def check_side(side: str) -> None:
    """A projection side: "right" (P is (r, n)) or "left" (P is (m, r))."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")


def check_2d(name: str, t: Tensor) -> None:
    check_floating(name, t)
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")


def check_projection(side: str, x: Tensor, p_shape: tuple[int, int], back: bool) -> None:
    """Shapes of a projection through P: forward takes ``g (m, n)`` (right: P ``(r, n)``; left:
    P ``(m, r)``), back takes ``low`` (right: ``(m, r)``; left: ``(r, n)``)."""
    check_side(side)
    name = "low" if back else "g"
    check_2d(name, x)
    pr, pc = p_shape
    if back:
        ok = x.shape[1] == pr if side == "right" else x.shape[0] == pc
        need = "low (m, r) and P (r, n)" if side == "right" else "low (r, n) and P (m, r)"
    else:
        ok = x.shape[1] == pc if side == "right" else x.shape[0] == pr
        need = "g (m, n) and P (r, n)" if side == "right" else "g (m, n) and P (m, r)"
    if not ok:
        raise ValueError(f"side={side!r} needs {need}, got {tuple(x.shape)}, {(pr, pc)}")


def check_shape(shape: Sequence[int]) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints, or a TypeError/ValueError naming it."""
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise ValueError(f"shape must hold non-negative ints, got {shape!r}")
    return dims


def check_packed(packed: Tensor, numel: int) -> None:
    """``packed`` must hold ``numel`` INT4 codes two to a byte: uint8, 1-D, ``ceil(numel / 2)`` bytes."""
    check_dtype("packed", packed, torch.uint8)
    if isinstance(numel, bool) or not isinstance(numel, int) or numel < 0:
        raise ValueError(f"numel must be a non-negative int, got {numel!r}")
    if packed.dim() != 1 or packed.numel() != (numel + 1) // 2:
        raise ValueError(
            f"packed must be 1-D with ceil(numel / 2) = {(numel + 1) // 2} bytes, got {tuple(packed.shape)}"
        )
