"""Triton kernels of the group-wise INT8 weight format (docs/internals.md, "INT8 weight").

Same signatures and math as ``int8_ref.py``: ``q: int8 [*shape]``, ``scale: fp32 [n_groups]``,
``zero: fp32 [n_groups] | None`` (None = symmetric), groups of ``group_size`` consecutive elements
of the row-major flattening, the last one possibly short.

Layout of the work: a program owns ``GPB`` whole groups, seen as a ``[GPB, BLOCK_GS]`` tile
(``BLOCK_GS`` = ``group_size`` rounded up to a power of two, the excess masked), so a group's
statistics are a row reduction in registers and ``int8_update_triton`` is one pass over memory:
read q + old scale/zero + delta, write q' + new scale/zero (6 bytes an element for fp32 delta).

Exactness: divisions use ``div_rn`` (IEEE round-to-nearest; a plain ``/`` is approximate on
NVIDIA GPUs) and rounding is half-to-even like ``torch.round``, so quantize/dequantize match the
reference bit for bit on the same inputs (the reference on CPU: torch on CUDA divides by a scalar
through its reciprocal, 1 ulp off at times). Stochastic rounding draws Philox bits keyed by
``seed`` and the element's position: same seed, same bits; they differ from the reference's.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._groups import n_groups
from .int8_ref import dequantize_int8_ref, host_scalars, int8_update_ref, quantize_int8_ref

__all__ = ["quantize_int8_triton", "dequantize_int8_triton", "int8_update_triton"]

# Largest group kept whole in one tile (registers); larger groups fall back to the reference
# (torch ops on the same device). Real configs use 64..1024.
MAX_TILE_GROUP = 16384
_TILE_ELEMS = 4096  # elements a program handles (GPB * BLOCK_GS) when groups are small
_empty = torch.empty  # every output allocation goes through here (tests poison it)
# Stochastic-rounding keys with a device step: (seed + step) mod 2**62.
_KEY_MOD: tl.constexpr = tl.constexpr(2**62)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: Tensor | None) -> None:
    """Raise ValueError unless all tensors are on one CUDA device (any device under the interpreter)."""
    devs = {t.device for t in tensors if t is not None}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}")
    if not interpreting() and any(d.type != "cuda" for d in devs):
        raise ValueError("Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


def check_numel(numel: int) -> None:
    """The kernels index with int32: refuse tensors of 2**31 elements or more."""
    if numel >= 2**31:
        raise ValueError(f"tensors of {numel} >= 2**31 elements are not supported by the Triton kernels")


def group_tiling(group_size: int) -> tuple[int, int, int]:
    """``(BLOCK_GS, GPB, num_warps)`` for a group tile: groups per program and warps per program."""
    block_gs = max(4, triton.next_power_of_2(group_size))  # >= 4: see _uniform_tile
    gpb = max(1, _TILE_ELEMS // block_gs)
    tile = gpb * block_gs
    num_warps = 4 if tile <= 2048 else (8 if tile <= 8192 else 16)
    return block_gs, gpb, num_warps


# --- device helpers ----------------------------------------------------------------------------


@triton.jit
def _rint(x):
    """Round half to even (``torch.round``), exact for fp32."""
    r = tl.floor(x)
    d = x - r  # exact for |x| < 2**23; larger values are integral (d == 0)
    odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, r + 1.0, r)


@triton.jit
def _group_tile(pid, numel, n_grp, GS: tl.constexpr, GPB: tl.constexpr, BLOCK_GS: tl.constexpr):
    """Group ids ``[GPB]``, element offsets ``[GPB, BLOCK_GS]``, element mask, group mask."""
    groups = pid * GPB + tl.arange(0, GPB)
    cols = tl.arange(0, BLOCK_GS)
    offs = groups[:, None] * GS + cols[None, :]
    mask = (cols[None, :] < GS) & (offs < numel)
    return groups, offs, mask, groups < n_grp


@triton.jit
def _group_stats(w, mask, SYMMETRIC: tl.constexpr):
    """New ``(scale [GPB], zero [GPB])`` of fp32 ``w [GPB, BLOCK_GS]`` (masked entries ignored)."""
    mx = tl.max(tl.where(mask, w, -float("inf")), axis=1)
    mn = tl.min(tl.where(mask, w, float("inf")), axis=1)
    # Rows past the last group hold no element: give them finite stats (never stored).
    none = mn > mx
    mx = tl.where(none, 0.0, mx)
    mn = tl.where(none, 0.0, mn)
    if SYMMETRIC:
        scale = tl.math.div_rn(tl.maximum(-mn, mx), 127.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        zero = tl.zeros_like(scale)  # unused
    else:
        scale = tl.where(mx == mn, 1.0, tl.math.div_rn(mx - mn, 255.0))
        zero = -tl.math.div_rn(mn, scale) - 128.0
    return scale, zero


@triton.jit
def _to_grid(w, scale, zero, SYMMETRIC: tl.constexpr):
    """``w / scale + zero`` per row (fp32)."""
    x = tl.math.div_rn(w, scale[:, None])
    if not SYMMETRIC:
        x = x + zero[:, None]
    return x


@triton.jit
def _uniform_tile(seed, groups, GPB: tl.constexpr, BLOCK_GS: tl.constexpr):
    """``u [GPB, BLOCK_GS]`` in [0, 1) on a 2**-24 grid from Philox keyed by ``seed``.

    One Philox-4x32 call yields 4 words: it serves 4 elements (counter = group * BLOCK_GS / 4 +
    column quarter, unique in the tensor), a quarter of the work of one call per element. The top
    24 bits of a word make u, so u < 1 and floor(x + u) is floor(x) or ceil(x), P(ceil) = frac(x).
    """
    ctr = groups[:, None] * (BLOCK_GS // 4) + tl.arange(0, BLOCK_GS // 4)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, ctr)
    r = tl.reshape(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (GPB, BLOCK_GS))
    return (r >> 8).to(tl.float32) * (1.0 / 16777216.0)


# --- kernels -------------------------------------------------------------------------------------


@triton.jit
def _quantize_int8_kernel(
    w_ptr, q_ptr, scale_ptr, zero_ptr, numel, n_grp,
    GS: tl.constexpr, GPB: tl.constexpr, BLOCK_GS: tl.constexpr, SYMMETRIC: tl.constexpr,
):  # fmt: skip
    groups, offs, mask, gmask = _group_tile(tl.program_id(0), numel, n_grp, GS, GPB, BLOCK_GS)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    scale, zero = _group_stats(w, mask, SYMMETRIC)
    x = _rint(_to_grid(w, scale, zero, SYMMETRIC))
    q = tl.minimum(tl.maximum(x, -128.0), 127.0)
    if SYMMETRIC:
        q = tl.maximum(q, -127.0)  # -128 unused: the grid is symmetric around 0
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + groups, scale, mask=gmask)
    if not SYMMETRIC:
        tl.store(zero_ptr + groups, zero, mask=gmask)


@triton.jit
def _dequantize_int8_kernel(
    q_ptr, scale_ptr, zero_ptr, out_ptr, numel, n_grp,
    GS: tl.constexpr, GPB: tl.constexpr, BLOCK_GS: tl.constexpr, SYMMETRIC: tl.constexpr,
):  # fmt: skip
    groups, offs, mask, gmask = _group_tile(tl.program_id(0), numel, n_grp, GS, GPB, BLOCK_GS)
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    scale = tl.load(scale_ptr + groups, mask=gmask, other=1.0)
    if not SYMMETRIC:
        q = q - tl.load(zero_ptr + groups, mask=gmask, other=0.0)[:, None]
    w = q * scale[:, None]
    tl.store(out_ptr + offs, w.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["decay", "seed"])
def _int8_update_kernel(
    q_ptr, scale_ptr, zero_ptr, delta_ptr, numel, n_grp, decay, seed, decay_ptr, step_ptr,
    GS: tl.constexpr, GPB: tl.constexpr, BLOCK_GS: tl.constexpr, SYMMETRIC: tl.constexpr,
    DEVICE_SCALARS: tl.constexpr,
):  # fmt: skip
    groups, offs, mask, gmask = _group_tile(tl.program_id(0), numel, n_grp, GS, GPB, BLOCK_GS)
    if DEVICE_SCALARS:  # read at run time: a CUDA graph replays this launch as the step advances
        decay = tl.load(decay_ptr)
        seed = seed.to(tl.int64) + tl.load(step_ptr).to(tl.int64)  # < 2**63: seed < 2**62, step < 2**62
        seed = tl.where(seed >= _KEY_MOD, seed - _KEY_MOD, seed)
    # Old weights, dequantized in fp32 exactly as dequantize_int8 does.
    w = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    if not SYMMETRIC:
        w = w - tl.load(zero_ptr + groups, mask=gmask, other=0.0)[:, None]
    w = w * tl.load(scale_ptr + groups, mask=gmask, other=1.0)[:, None]
    w = w * decay + tl.load(delta_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # New group statistics from the updated values, then the stochastic rounding to the new grid.
    scale, zero = _group_stats(w, mask, SYMMETRIC)
    # x by one reciprocal per group rather than a division per element: within an ulp of w / scale,
    # which moves P(ceil) by ~1e-7 of a step (the bits of u are 2**-24 apart anyway).
    x = w * tl.math.div_rn(1.0, scale)[:, None]
    if not SYMMETRIC:
        x = x + zero[:, None]
    u = _uniform_tile(seed, groups, GPB, BLOCK_GS)
    q = tl.minimum(tl.maximum(tl.floor(x + u), -128.0), 127.0)
    if SYMMETRIC:
        q = tl.maximum(q, -127.0)
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)
    tl.store(scale_ptr + groups, scale, mask=gmask)
    if not SYMMETRIC:
        tl.store(zero_ptr + groups, zero, mask=gmask)


# --- wrappers --------------------------------------------------------------------------------------


def quantize_int8_triton(
    w: Tensor, group_size: int = 256, symmetric: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest INT8 quantization of ``w`` (any floating dtype and shape), computed in fp32.

    Returns ``(q int8 [*w.shape], scale fp32 [n_groups], zero fp32 [n_groups] or None)``;
    identical to :func:`quantize_int8_ref`.
    """
    check_device(w)
    check_numel(w.numel())
    if group_size > MAX_TILE_GROUP:
        return quantize_int8_ref(w, group_size, symmetric)
    numel, g = w.numel(), n_groups(w.numel(), group_size)
    q = _empty(w.shape, dtype=torch.int8, device=w.device)
    scale = _empty(g, dtype=torch.float32, device=w.device)
    zero = None if symmetric else _empty(g, dtype=torch.float32, device=w.device)
    if numel == 0:
        return q, scale, zero
    block_gs, gpb, warps = group_tiling(group_size)
    _quantize_int8_kernel[(triton.cdiv(g, gpb),)](
        w.contiguous(), q, scale, scale if zero is None else zero, numel, g,
        GS=group_size, GPB=gpb, BLOCK_GS=block_gs, SYMMETRIC=symmetric, num_warps=warps,
    )  # fmt: skip
    return q, scale, zero


def dequantize_int8_triton(
    q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(q - zero) * scale`` (``q * scale`` if ``zero`` is None) in fp32, returned in ``dtype``.

    ``q: int8 [*shape]``, ``scale``/``zero``: fp32 ``[n_groups]``; result ``dtype [*shape]``.
    """
    check_device(q, scale, zero)
    check_numel(q.numel())
    if group_size > MAX_TILE_GROUP or dtype == torch.float64:
        return dequantize_int8_ref(q, scale, zero, group_size, dtype)
    out = _empty(q.shape, dtype=dtype, device=q.device)
    numel, g = q.numel(), scale.numel()
    if numel == 0:
        return out
    block_gs, gpb, warps = group_tiling(group_size)
    _dequantize_int8_kernel[(triton.cdiv(g, gpb),)](
        q.contiguous(), scale, scale if zero is None else zero, out, numel, g,
        GS=group_size, GPB=gpb, BLOCK_GS=block_gs, SYMMETRIC=zero is None, num_warps=warps,
    )  # fmt: skip
    return out


def int8_update_triton(
    q: Tensor, scale: Tensor, zero: Tensor | None, delta: Tensor, decay: float | Tensor, group_size: int,
    seed: int, step: Tensor | None = None,
) -> None:
    """In place, one pass: ``w' = decay * dequant(q) + delta``; new scale/zero; ``q' = SR(w'/scale+zero)``.

    ``q``: contiguous int8 ``[*shape]``; ``scale``/``zero``: fp32 ``[n_groups]`` (``zero`` None:
    symmetric, stays symmetric); ``delta``: floating ``[*shape]`` (fp32 expected; bf16/fp16 are
    widened in registers). Stochastic rounding uses Philox keyed by ``seed`` and the element position.
    With ``step`` (int ``[1]`` on q's device) the key is ``(seed + step) mod 2**62`` and ``decay`` a
    1-element fp32 tensor, both read by the kernel (`qgl.kernels.int8_update_`).
    """
    check_device(q, scale, zero, delta)
    check_numel(q.numel())
    if group_size > MAX_TILE_GROUP or delta.dtype == torch.float64:
        if step is not None:  # the reference takes host numbers
            decay, seed = host_scalars(decay, seed, step)
        int8_update_ref(q, scale, zero, delta, float(decay), group_size, seed)
        return
    numel, g = q.numel(), scale.numel()
    if numel == 0:
        return
    # Philox takes a 64-bit key; fold any Python int into [0, 2**63) (negative seeds included).
    seed = int(seed) & (2**63 - 1)
    device_scalars = step is not None
    block_gs, gpb, warps = group_tiling(group_size)
    _int8_update_kernel[(triton.cdiv(g, gpb),)](
        q, scale, scale if zero is None else zero, delta.contiguous(), numel, g,
        1.0 if device_scalars else float(decay), seed,
        decay if device_scalars else scale, step if device_scalars else scale,
        GS=group_size, GPB=gpb, BLOCK_GS=block_gs, SYMMETRIC=zero is None, DEVICE_SCALARS=device_scalars,
        num_warps=warps,
    )  # fmt: skip
