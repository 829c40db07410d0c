"""Triton kernels of the packed INT4 format: quantize, dequantize, pack, unpack (``int4_ref.py``).

``packed: uint8 [ceil(numel / 2)]`` (byte k = element 2k in the low nibble, 2k + 1 in the high
nibble), fp32 ``scale``/``zero`` per group of ``group_size`` row-major elements,
``p ~= (q - zero) * scale``, q in 0..15 (docs/internals.md, "INT4 projection"). The projection
matmuls reading this format are in ``int4_triton.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._groups import (
    n_groups,
)
from .int4_ref import quantize_int4_ref
from .int8_triton import MAX_TILE_GROUP, _rint, check_device, check_numel, group_tiling

__all__ = ["quantize_int4_triton", "dequantize_int4_triton", "pack_int4_triton", "unpack_int4_triton"]

_BYTES_PER_PROGRAM = 2048  # element-wise kernels: bytes of packed codes per program
_empty = torch.empty  # every output allocation goes through here (tests poison it)


# --- element-wise kernels ----------------------------------------------------------------------


@triton.jit
def _int4_stats_kernel(p_ptr, scale_ptr, zero_ptr, numel, n_grp,
                       GS: tl.constexpr, GPB: tl.constexpr, BLOCK_GS: tl.constexpr):  # fmt: skip
    """Per group: ``scale = (max - min) / 15`` (1 if constant), ``zero = -min / scale``."""
    groups = tl.program_id(0) * GPB + tl.arange(0, GPB)
    cols = tl.arange(0, BLOCK_GS)
    offs = groups[:, None] * GS + cols[None, :]
    mask = (cols[None, :] < GS) & (offs < numel)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mx = tl.max(tl.where(mask, p, -float("inf")), axis=1)
    mn = tl.min(tl.where(mask, p, float("inf")), axis=1)
    none = mn > mx  # rows past the last group: finite values, never stored
    mx = tl.where(none, 0.0, mx)
    mn = tl.where(none, 0.0, mn)
    scale = tl.where(mx == mn, 1.0, tl.math.div_rn(mx - mn, 15.0))
    gmask = groups < n_grp
    tl.store(scale_ptr + groups, scale, mask=gmask)
    tl.store(zero_ptr + groups, -tl.math.div_rn(mn, scale), mask=gmask)


@triton.jit
def _int4_code(p_ptr, s_ptr, z_ptr, idx, mask, GS: tl.constexpr):
    """Round-to-nearest code (int32 0..15) of elements ``idx``; 0 where masked."""
    p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = idx // GS
    s = tl.load(s_ptr + g, mask=mask, other=1.0)
    z = tl.load(z_ptr + g, mask=mask, other=0.0)
    q = tl.minimum(tl.maximum(_rint(tl.math.div_rn(p, s) + z), 0.0), 15.0)
    return tl.where(mask, q, 0.0).to(tl.int32)


@triton.jit
def _int4_quant_pack_kernel(p_ptr, s_ptr, z_ptr, out_ptr, numel, n_bytes,
                            GS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """Byte k = code(2k) | code(2k + 1) << 4 (the group stats are already written)."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = _int4_code(p_ptr, s_ptr, z_ptr, 2 * k, 2 * k < numel, GS)
    hi = _int4_code(p_ptr, s_ptr, z_ptr, 2 * k + 1, 2 * k + 1 < numel, GS)
    tl.store(out_ptr + k, (lo | (hi << 4)).to(tl.uint8), mask=k < n_bytes)


@triton.jit
def _int4_dequant_kernel(b_ptr, s_ptr, z_ptr, out_ptr, numel, n_bytes,
                         GS: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    """``out[2k + h] = (nibble h of byte k - zero) * scale`` in fp32, stored in out's dtype."""
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(b_ptr + k, mask=k < n_bytes, other=0).to(tl.int32)
    idx = 2 * tl.program_id(0) * BLOCK + tl.arange(0, 2 * BLOCK)
    q = tl.interleave(b & 15, b >> 4).to(tl.float32)  # element order: lo, hi, lo, hi, ...
    mask = idx < numel
    g = idx // GS
    w = (q - tl.load(z_ptr + g, mask=mask, other=0.0)) * tl.load(s_ptr + g, mask=mask, other=1.0)
    tl.store(out_ptr + idx, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _pack_kernel(q_ptr, out_ptr, numel, n_bytes, BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.load(q_ptr + 2 * k, mask=2 * k < numel, other=0)
    hi = tl.load(q_ptr + 2 * k + 1, mask=2 * k + 1 < numel, other=0)
    tl.store(out_ptr + k, lo | (hi << 4), mask=k < n_bytes)


@triton.jit
def _unpack_kernel(b_ptr, out_ptr, numel, n_bytes, BLOCK: tl.constexpr):
    k = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    b = tl.load(b_ptr + k, mask=k < n_bytes, other=0)
    idx = 2 * tl.program_id(0) * BLOCK + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + idx, tl.interleave(b & 15, b >> 4), mask=idx < numel)


# --- format conversions -----------------------------------------------------------------------------


def _launch_bytes(kernel, n_bytes: int, *args) -> None:
    kernel[(triton.cdiv(n_bytes, _BYTES_PER_PROGRAM),)](*args, BLOCK=_BYTES_PER_PROGRAM, num_warps=8)


def quantize_int4_triton(p: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest INT4 of ``p`` (any floating dtype and shape), computed in fp32.

    Returns ``(packed uint8 [ceil(numel / 2)], scale fp32 [n_groups], zero fp32 [n_groups])``.
    Two launches (group statistics, then codes and packing): P is small and stays in L2.
    """
    check_device(p)
    check_numel(p.numel())
    if group_size > MAX_TILE_GROUP:
        return quantize_int4_ref(p, group_size)
    numel, g = p.numel(), n_groups(p.numel(), group_size)
    n_bytes = (numel + 1) // 2
    packed = _empty(n_bytes, dtype=torch.uint8, device=p.device)
    scale = _empty(g, dtype=torch.float32, device=p.device)
    zero = _empty(g, dtype=torch.float32, device=p.device)
    if numel == 0:
        return packed, scale, zero
    pc = p.contiguous()
    block_gs, gpb, warps = group_tiling(group_size)
    _int4_stats_kernel[(triton.cdiv(g, gpb),)](
        pc, scale, zero, numel, g, GS=group_size, GPB=gpb, BLOCK_GS=block_gs, num_warps=warps
    )
    _launch_bytes(_int4_quant_pack_kernel, n_bytes, pc, scale, zero, packed, numel, n_bytes, group_size)
    return packed, scale, zero


def dequantize_int4_triton(
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
    check_device(packed, scale, zero)
    check_numel(numel)
    out = _empty(dims, dtype=dtype, device=packed.device)
    if numel:
        n_bytes = packed.numel()
        _launch_bytes(_int4_dequant_kernel, n_bytes, packed, scale, zero, out, numel, n_bytes, group_size)
    return out


def pack_int4_triton(q: Tensor) -> Tensor:
    """Pack ``q: uint8`` codes in 0..15 (any shape, row-major) into ``uint8 [ceil(numel / 2)]``."""
    check_device(q)
    check_numel(q.numel())
    numel = q.numel()
    n_bytes = (numel + 1) // 2
    out = _empty(n_bytes, dtype=torch.uint8, device=q.device)
    if numel:
        _launch_bytes(_pack_kernel, n_bytes, q.contiguous(), out, numel, n_bytes)
    return out


def unpack_int4_triton(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_int4_triton`: ``packed uint8 [ceil(numel / 2)]`` -> ``uint8 [numel]``."""
    check_device(packed)
    check_numel(numel)
    out = _empty(numel, dtype=torch.uint8, device=packed.device)
    if numel:
        _launch_bytes(_unpack_kernel, packed.numel(), packed, out, numel, packed.numel())
    return out
