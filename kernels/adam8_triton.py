"""Triton kernel of 8-bit blockwise Adam (bitsandbytes' format) whose step count may live on the device.

``adam8_direction_triton`` is ``qgl.optim.adam._direction_8bit_ref`` in one pass: it advances the
8-bit moments in place and returns Adam's fp32 direction. Unlike bitsandbytes'
``optimizer_update_8bit_blockwise``, which takes the step as a host int (a captured CUDA graph would
replay the bias corrections of the capture's step), the step may be a 1-element int32/int64 tensor
read by the kernel: a graph can ``step_t.add_(1)`` and replay.

Format (``qgl.quant.blockwise8``): ``codes uint8 [N]`` (any shape, contiguous) and ``absmax fp32
[ceil(N / 256)]``; value = ``qmap[code] * absmax`` of the element's block of 256 consecutive row-major
elements; ``qmap`` fp32 [256] ascending (``dynamic_map(True)`` for m, ``dynamic_map(False)`` for v).

Layout: a program owns ``_BPP`` consecutive blocks as a ``[_BPP, 256]`` tile (the last block masked
where short): it reads codes + absmax + grad and writes codes + absmax + direction (12 bytes an
element for an fp32 grad); a block's new absmax is a row reduction in registers.

Code search: the nearest entry, ties to the lower one, is the number of the 255 midpoints of the map
strictly below x (what ``torch.bucketize`` gives the reference). A branch-free binary search finds it
in 8 gathers from a 1 KiB table that stays in L1; it is exact for any ascending map. The midpoints are
computed once per map in fp32 exactly as the reference computes them and cached.

Bias corrections: ``1 - beta**step`` in fp64 (beta passed as its fp64 bit pattern; Triton passes
Python floats as fp32), ``beta**step`` by square-and-multiply (exact IEEE products; the interpreter has
no libdevice ``pow``), then rounded to fp32 as torch rounds the reference's Python doubles. An int step
takes the same path as a scalar argument, so both forms give identical bits.

Exactness: the moment updates use the fma that torch's kernels use, divisions ``div_rn`` and square
roots ``sqrt_rn`` (IEEE). Against the CPU reference: same codes and absmax in the tests; the direction
differs by an ulp where torch's CPU fp32 ``sqrt`` is not correctly rounded (about 1 element in 6 on an
AVX-512 build). torch on CUDA divides by a Python scalar through its reciprocal: an ulp there too. A
code on a rounding boundary may thus move by one.
"""

from __future__ import annotations

import struct
import weakref

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._groups import check_dtype, check_floating, n_groups
from .int8_triton import check_device, check_numel

__all__ = ["adam8_direction_triton"]

BLOCK = 256  # elements per absmax entry (qgl.optim.adam.BLOCK_8BIT, bitsandbytes' blockwise Adam)
# Blocks per program and warps: a [2, 256] tile, 4 elements a thread (56 registers on sm_90, no
# spills; [4, 256] with 4 warps needs 90). Untuned: to be measured on the H100.
_BPP = 2
_NUM_WARPS = 4
_empty = torch.empty  # the direction's allocation goes through here (tests poison it)


# --- device helpers ------------------------------------------------------------------------------


@triton.jit
def _pow_f64(b, t):
    """``b ** t`` in fp64 for a scalar int ``t >= 0``: square-and-multiply, log2(t) + 1 rounds."""
    p = tl.full([], 1.0, tl.float64)
    while t > 0:
        p = tl.where((t & 1) != 0, p * b, p)
        b = b * b
        t = t >> 1
    return p


@triton.jit
def _bias_corrections(t, beta1_bits, beta2_bits):
    """fp32 ``(1 - beta1**t, sqrt(1 - beta2**t))`` computed in fp64, betas as fp64 bit patterns."""
    # An int argument below 2**31 arrives as int32: widen before the bitcast (beta 0 has bits 0).
    b1 = beta1_bits.to(tl.int64).to(tl.float64, bitcast=True)
    b2 = beta2_bits.to(tl.int64).to(tl.float64, bitcast=True)
    bc1 = (1.0 - _pow_f64(b1, t)).to(tl.float32)
    bc2 = tl.sqrt(1.0 - _pow_f64(b2, t)).to(tl.float32)  # fp64 sqrt is IEEE-rounded
    return bc1, bc2


@triton.jit
def _requantize(x, mask, offs, blocks, bmask, mids_ptr, codes_ptr, absmax_ptr, KEEP_POSITIVE: tl.constexpr):
    """Store the codes and block absmax of fp32 ``x [BPP, 256]`` (masked lanes ignored)."""
    amax = tl.max(tl.where(mask, tl.abs(x), 0.0), axis=1)
    tl.store(absmax_ptr + blocks, amax, mask=bmask)
    y = tl.math.div_rn(x, tl.where(amax == 0.0, 1.0, amax)[:, None])
    # Count of midpoints < y: at the probe of width h, code is a multiple of 2h, and all of
    # mids[code .. code + h - 1] are below y iff the last one is. Indices stay in 0..254.
    code = tl.zeros(y.shape, dtype=tl.int32)
    for i in tl.static_range(8):
        probe = tl.load(mids_ptr + code + ((128 >> i) - 1))
        code = tl.where(probe < y, code + (128 >> i), code)
    if KEEP_POSITIVE:
        # The reference's rule for v: code 0 (the value 0) becomes 1 where v > 0, so that a
        # later zero gradient does not divide m by eps alone.
        code = tl.where((code == 0) & (x > 0.0), 1, code)
    tl.store(codes_ptr + offs, code.to(tl.uint8), mask=mask)


@triton.jit(do_not_specialize=["step", "beta1_bits", "beta2_bits"])
def _adam8_kernel(
    grad_ptr, out_ptr, m_codes_ptr, m_absmax_ptr, v_codes_ptr, v_absmax_ptr,
    qmap_m_ptr, qmap_v_ptr, mids_m_ptr, mids_v_ptr, step_ptr,
    numel, n_blocks, step, beta1, omb1, beta2, omb2, eps, beta1_bits, beta2_bits,
    STEP_IN_MEMORY: tl.constexpr, BPP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):  # fmt: skip
    blocks = tl.program_id(0) * BPP + tl.arange(0, BPP)
    offs = blocks[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    mask = offs < numel
    bmask = blocks < n_blocks
    # A step in memory is read at run time: a replayed graph sees the step advanced in place.
    t = tl.load(step_ptr) if STEP_IN_MEMORY else step
    bc1, bc2 = _bias_corrections(t, beta1_bits, beta2_bits)

    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    cm = tl.load(m_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    cv = tl.load(v_codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    m = tl.load(qmap_m_ptr + cm) * tl.load(m_absmax_ptr + blocks, mask=bmask, other=0.0)[:, None]
    v = tl.load(qmap_v_ptr + cv) * tl.load(v_absmax_ptr + blocks, mask=bmask, other=0.0)[:, None]
    # The reference's operations: mul_(b1).add_(g, alpha=1-b1), mul_(b2).addcmul_(g, g, value=1-b2),
    # with the fma that torch's kernels use (CPU vectorized add, and nvcc's contraction on CUDA);
    # explicit, so the result does not depend on Triton's fp-fusion default.
    m = tl.fma(g, omb1, m * beta1)
    v = tl.fma(omb2 * g, g, v * beta2)
    # Direction from the fp32 moments before requantization, as the reference and bitsandbytes.
    denom = tl.math.div_rn(tl.sqrt_rn(v), bc2) + eps
    d = tl.math.div_rn(tl.math.div_rn(m, bc1), denom)
    tl.store(out_ptr + offs, d, mask=mask)
    _requantize(m, mask, offs, blocks, bmask, mids_m_ptr, m_codes_ptr, m_absmax_ptr, KEEP_POSITIVE=False)
    _requantize(v, mask, offs, blocks, bmask, mids_v_ptr, v_codes_ptr, v_absmax_ptr, KEEP_POSITIVE=True)


# --- wrapper ---------------------------------------------------------------------------------------

# id(qmap) -> (weak reference, (_version, device), midpoints). A map is checked (one host read) and
# its midpoints made on first use and after an in-place write; warm up before a graph capture.
_MIDS: dict[int, tuple[weakref.ref, tuple[int, torch.device], Tensor]] = {}


def _midpoints(name: str, qmap: Tensor) -> Tensor:
    key, state = id(qmap), (qmap._version, qmap.device)
    hit = _MIDS.get(key)
    if hit is not None and hit[0]() is qmap and hit[1] == state:
        return hit[2]
    check_dtype(name, qmap, torch.float32)
    if qmap.shape != (256,):
        raise ValueError(f"{name} must have shape (256,), got {tuple(qmap.shape)}")
    if bool((qmap[1:] < qmap[:-1]).any()):
        raise ValueError(f"{name} must be sorted ascending (as bitsandbytes' dynamic maps are)")
    mids = (qmap[1:] + qmap[:-1]) / 2  # as qgl.quant.blockwise8.quantize_blockwise, bit for bit
    _MIDS[key] = (weakref.ref(qmap, lambda _, key=key: _MIDS.pop(key, None)), state, mids)
    return mids


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", x))[0]


def adam8_direction_triton(
    grad: Tensor,
    exp_avg_codes: Tensor,
    exp_avg_absmax: Tensor,
    exp_avg_sq_codes: Tensor,
    exp_avg_sq_absmax: Tensor,
    qmap_signed: Tensor,
    qmap_unsigned: Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    step: int | Tensor,
    out: Tensor | None = None,
) -> Tensor:
    """Advance the 8-bit moments by ``grad`` in place and return the fp32 Adam direction.

    ``grad``: any float dtype and shape, N elements; codes: uint8, N elements, contiguous; absmax:
    fp32 ``[ceil(N / 256)]``; qmaps: fp32 ``[256]`` ascending. ``step`` counts from 1: a Python int
    or a 1-element int32/int64 tensor on grad's device, read by the kernel (``1 <= step < 2**31``).
    ``out``: optional contiguous fp32 buffer of grad's shape; returned (fp32, grad's shape).
    No host synchronization except the first use of a qmap (its order check).
    """
    check_floating("grad", grad)
    numel, nb = grad.numel(), n_groups(grad.numel(), BLOCK)
    for name, codes, absmax in (
        ("exp_avg", exp_avg_codes, exp_avg_absmax),
        ("exp_avg_sq", exp_avg_sq_codes, exp_avg_sq_absmax),
    ):
        check_dtype(f"{name}_codes", codes, torch.uint8)
        if codes.numel() != numel or not codes.is_contiguous():
            got = f"{tuple(codes.shape)}{'' if codes.is_contiguous() else ' (not contiguous)'}"
            raise ValueError(f"{name}_codes must be contiguous with {numel} elements, got {got}")
        check_dtype(f"{name}_absmax", absmax, torch.float32)
        if absmax.shape != (nb,):
            got = tuple(absmax.shape)
            raise ValueError(f"{name}_absmax must have shape ({nb},) for {numel} elements, got {got}")
    for name, beta in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {beta!r}")
    if isinstance(step, Tensor):
        check_dtype("step", step, torch.int32, torch.int64)
        if step.numel() != 1:
            raise ValueError(f"a step tensor must have 1 element, got shape {tuple(step.shape)}")
        step_t, step_int = step, 0
    elif isinstance(step, bool) or not isinstance(step, int) or not 1 <= step < 2**31:
        raise ValueError(f"step must be an int in [1, 2**31) or a 1-element tensor, got {step!r}")
    else:
        step_t, step_int = None, step
    if out is None:
        out = _empty(grad.shape, dtype=torch.float32, device=grad.device)
    else:
        check_dtype("out", out, torch.float32)
        if out.shape != grad.shape or not out.is_contiguous():
            want, got = tuple(grad.shape), tuple(out.shape)
            raise ValueError(f"out must be contiguous with grad's shape {want}, got {got}")
    check_device(grad, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
                 qmap_signed, qmap_unsigned, step_t, out)  # fmt: skip
    check_numel(numel)
    mids_m, mids_v = _midpoints("qmap_signed", qmap_signed), _midpoints("qmap_unsigned", qmap_unsigned)
    if numel == 0:
        return out
    _adam8_kernel[(triton.cdiv(nb, _BPP),)](
        grad.contiguous(), out, exp_avg_codes, exp_avg_absmax, exp_avg_sq_codes, exp_avg_sq_absmax,
        qmap_signed, qmap_unsigned, mids_m, mids_v, exp_avg_absmax if step_t is None else step_t,
        numel, nb, step_int, float(beta1), 1.0 - beta1, float(beta2), 1.0 - beta2, float(eps),
        _f64_bits(float(beta1)), _f64_bits(float(beta2)),
        STEP_IN_MEMORY=step_t is not None, BPP=_BPP, BLOCK_SIZE=BLOCK, num_warps=_NUM_WARPS,
    )  # fmt: skip
    return out
