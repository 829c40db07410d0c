"""8-bit blockwise optimizer state in bitsandbytes' dynamic format (docs/internals.md, last format).

``codes: uint8 [numel]``, ``absmax: fp32 [ceil(numel / block)]``; value = ``qmap[code] * absmax``
of the element's block of ``block`` consecutive row-major elements. ``qmap`` is the 256-entry
dynamic map of ``bitsandbytes.functional.create_dynamic_map`` (signed for Adam's first moment,
unsigned for the second). This is the plain-torch math; on CUDA the optimizer may call
bitsandbytes' kernels on the same tensors. Work is done in chunks so that temporaries stay small
whatever the state's size.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from qgl.kernels._groups import check_dtype, check_floating, group_views, n_groups

__all__ = ["dynamic_map", "quantize_blockwise", "dequantize_blockwise"]

_CHUNK = 1 << 22  # elements per chunk: bounds the fp32/int32 temporaries to 16 MiB each


def dynamic_map(signed: bool = True) -> Tensor:
    """bitsandbytes' dynamic 8-bit map: fp32 ``[256]``, ascending, max entry 1.0.

    Decade ``i`` (``1e-6 .. 1``) holds ``2**i`` (signed; twice as many unsigned) means of a linear
    grid on ``[0.1, 1]`` scaled by ``10**(i - 6)``, mirrored for the signed map, plus 0 and 1.
    Built with the same fp32 operations as ``create_dynamic_map(signed)`` so that it is equal bit
    for bit (7 exponent bits, 8 bits in all, no linear region).
    """
    parts = [torch.tensor([0.0, 1.0], dtype=torch.float32)]
    for i in range(7):
        n_means = 2**i if signed else 2 ** (i + 1)
        bounds = torch.linspace(0.1, 1, n_means + 1, dtype=torch.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        decade = (10 ** (i - 6)) * means
        parts.append(decade)
        if signed:
            parts.append(-decade)
    return torch.sort(torch.cat(parts)).values


def _check_block(block: int) -> None:
    if isinstance(block, bool) or not isinstance(block, int) or block <= 0:
        raise ValueError(f"block must be a positive int, got {block!r}")


# The maps found valid: id(qmap) -> (a weak reference to it, its (_version, dtype, shape) then). The
# 8-bit Adam passes the same two maps to its 4 (de)quantize calls of every update, and the order
# check is 4 ops and a read of the result on the host; so each map is checked once, and again after
# an in-place write (it bumps the tensor's version counter; a write through `.data`, which has its
# own counter, is not seen). An entry goes with its tensor (the weak reference's callback).
_CHECKED_QMAPS: dict[int, tuple[weakref.ref, tuple[int, torch.dtype, torch.Size]]] = {}


def _forget_qmap(key: int, ref: weakref.ref) -> None:
    if _CHECKED_QMAPS.get(key, (None,))[0] is ref:
        del _CHECKED_QMAPS[key]


def _check_qmap(qmap: Tensor) -> None:
    """Raise unless `qmap` is fp32, 1-D, 2..256 entries, ascending; a map already found so and not
    written since passes at the cost of a dict look-up."""
    key = id(qmap)
    seen = _CHECKED_QMAPS.get(key)
    # `is`: an id is reused only after its object died, and a dead map's entry is gone with it.
    if seen is not None and seen[0]() is qmap and seen[1] == (qmap._version, qmap.dtype, qmap.shape):
        return
    check_dtype("qmap", qmap, torch.float32)
    if qmap.dim() != 1 or not 2 <= qmap.numel() <= 256:
        raise ValueError(f"qmap must be 1-D with 2..256 entries, got shape {tuple(qmap.shape)}")
    if bool((qmap[1:] < qmap[:-1]).any()):
        raise ValueError("qmap must be sorted ascending (as bitsandbytes' dynamic maps are)")
    ref = weakref.ref(qmap, functools.partial(_forget_qmap, key))
    _CHECKED_QMAPS[key] = (ref, (qmap._version, qmap.dtype, qmap.shape))


def _chunks(numel: int, block: int):
    """``(start, stop)`` element ranges of about ``_CHUNK`` elements, aligned to blocks."""
    step = block * max(1, _CHUNK // block)
    for start in range(0, numel, step):
        yield start, min(start + step, numel)


def quantize_blockwise(x: Tensor, qmap: Tensor, block: int = 256) -> tuple[Tensor, Tensor]:
    """Quantize ``x`` (floating, any shape; math in fp32) to the nearest entry of ``qmap`` per block.

    Returns ``(codes uint8 [numel], absmax fp32 [ceil(numel / block)])``. A block of zeros gets
    ``absmax = 0`` and the code of the map's 0 entry. Ties between two entries go to the lower one.
    """
    check_floating("x", x)
    _check_qmap(qmap)
    _check_block(block)
    qmap = qmap.to(x.device)
    mids = (qmap[1:] + qmap[:-1]) / 2  # nearest entry = bucket among the midpoints
    flat = x.reshape(-1)
    codes = torch.empty(flat.numel(), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(n_groups(flat.numel(), block), dtype=torch.float32, device=x.device)
    for start, stop in _chunks(flat.numel(), block):
        first_block = start // block
        x_parts = group_views(flat[start:stop], block)
        c_parts = group_views(codes[start:stop], block)
        for (xv, blocks), (cv, _) in zip(x_parts, c_parts, strict=True):
            xv = xv.to(torch.float32, copy=True)
            mn, mx = torch.aminmax(xv, dim=1)
            amax = torch.maximum(mn.neg(), mx)
            absmax[first_block + blocks.start : first_block + blocks.stop].copy_(amax)
            xv.div_(amax.masked_fill_(amax == 0, 1.0)[:, None])
            cv.copy_(torch.bucketize(xv, mids, out_int32=True))
    return codes, absmax


def dequantize_blockwise(
    codes: Tensor, absmax: Tensor, qmap: Tensor, shape: Sequence[int], block: int = 256
) -> Tensor:
    """``qmap[codes] * absmax`` per block.

    ``codes uint8 [numel]``, ``absmax fp32 [ceil(numel / block)]`` -> fp32 ``[*shape]``.
    """
    check_dtype("codes", codes, torch.uint8)
    check_dtype("absmax", absmax, torch.float32)
    _check_qmap(qmap)
    _check_block(block)
    dims = tuple(int(d) for d in shape)
    numel = math.prod(dims)
    if codes.dim() != 1 or codes.numel() != numel:
        raise ValueError(
            f"codes must be 1-D with {numel} elements for shape {dims}, got {tuple(codes.shape)}"
        )
    if absmax.dim() != 1 or absmax.numel() != n_groups(numel, block):
        raise ValueError(
            f"absmax must be 1-D with {n_groups(numel, block)} blocks of {block}, got {tuple(absmax.shape)}"
        )
    qmap = qmap.to(codes.device)
    out = torch.empty(numel, dtype=torch.float32, device=codes.device)
    for start, stop in _chunks(numel, block):
        first_block = start // block
        torch.index_select(qmap, 0, codes[start:stop].to(torch.int32), out=out[start:stop])
        for ov, blocks in group_views(out[start:stop], block):
            ov.mul_(absmax[first_block + blocks.start : first_block + blocks.stop, None])
    return out.view(dims)
