"""Triton projection matmuls reading the packed INT4 format (docs/internals.md, "INT4 projection").

The format's own kernels (quantize, dequantize, pack, unpack) are in ``int4_format_triton.py`` and
re-exported here (``qgl.kernels`` imports each by name from ``int4_format_triton``).

Same signatures and math as ``int4_ref.py``: ``packed: uint8 [ceil(numel / 2)]`` (byte k = element
2k in the low nibble, 2k + 1 in the high nibble), fp32 ``scale``/``zero`` per group of
``group_size`` row-major elements, ``p ~= (q - zero) * scale``, q in 0..15.

The projections are one matmul kernel, ``C = A @ B`` (fp32 C), where one operand is the packed P
read directly (half a byte an element) and dequantized in registers, the other a dense gradient
(fp32/bf16/fp16, any strides). P is an ``(R, C)`` row-major matrix, used as:

==================  ======================  =========  ===========
op                  C                       P is       P's columns
==================  ======================  =========  ===========
project, right      g (m, n) @ P^T          B (N x K)  K
project, left       P^T @ g (m, n)          A (K x M)  M
project_back right  low (m, r) @ P          B (K x N)  N
project_back left   P @ low (r, n)          A (M x K)  K
==================  ======================  =========  ===========

A P tile is loaded as ``[rows, cols]`` along P's own layout (contiguous columns: byte loads of
half the tile, split into nibbles and interleaved back when P's row length is even), then
transposed as the matmul needs. Fast path: P's row length divisible by the group and the tile's
column extent dividing the group -> one (scale, zero) per tile row. Else a few group vectors per
row are selected per element (see ``_tiles.group_scales``; groups < 32 elements: dequantize
P, then torch's matmul). The dot runs on bf16 (or fp16) tensor cores with fp32 accumulation: fp32
dense operands are rounded to bf16 in registers (2**-9 relative, far below the INT4 step of P).

On a GPU the projections take the *dense* path by default (``path="auto"``, env
``QGL_INT4_PROJECTION=fused`` to force the kernel): P is dequantized to a transient bf16 (or fp16)
matrix, a few MB, and the product runs in cuBLAS with fp32 output (``torch.mm(out_dtype=)``),
operands rounded exactly as the fused kernel rounds them. The in-loop nibble unpacking costs the
fused kernel more than the dequantization costs the dense path (benchmarks/kernels_bench.py prints both).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._bench import do_bench
from ._tiles import group_scales, swizzle
from .int4_format_triton import (
    dequantize_int4_triton,
    pack_int4_triton,
    quantize_int4_triton,
    unpack_int4_triton,
)
from .int8_triton import check_device, check_numel, interpreting
from .mm16 import mm16, mm_fp32_out
from .w8a16_triton import MIN_KERNEL_GROUP

__all__ = [
    "quantize_int4_triton",
    "dequantize_int4_triton",
    "pack_int4_triton",
    "unpack_int4_triton",
    "int4_project_triton",
    "int4_project_back_triton",
    "dense_basis_triton",
]

_DENSE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_empty = torch.empty  # every output allocation goes through here (tests poison it)
# Used under TRITON_INTERPRET=1 (the autotuner needs a GPU); tests may change it.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}


# --- the projection matmul ------------------------------------------------------------------------


@triton.jit
def _p_tile(p_ptr, s_ptr, z_ptr, rows, col0, PR, PC, CT: tl.constexpr, GS: tl.constexpr,
            PC_DIV_GS: tl.constexpr, EVEN: tl.constexpr):  # fmt: skip
    """fp32 dequantized tile ``[len(rows), CT]`` of P ``(PR, PC)`` at rows x ``col0 + arange(CT)``.

    Out-of-range entries are 0 (they meet zero-padded dense entries, and ``(0 - zero) * scale``
    would not be 0). EVEN (PC even, col0 even): pairs of columns share a byte.
    """
    cols = col0 + tl.arange(0, CT)
    rmask = rows < PR
    mask = rmask[:, None] & (cols < PC)[None, :]
    if EVEN:
        bcols = col0 // 2 + tl.arange(0, CT // 2)
        bmask = rmask[:, None] & (bcols < PC // 2)[None, :]
        b = tl.load(p_ptr + rows[:, None] * (PC // 2) + bcols[None, :], mask=bmask, other=0).to(tl.int32)
        q = tl.interleave(b & 15, b >> 4)
    else:
        idx = rows[:, None] * PC + cols[None, :]
        b = tl.load(p_ptr + (idx >> 1), mask=mask, other=0).to(tl.int32)
        q = (b >> ((idx & 1) * 4)) & 15
    rows_c = tl.minimum(rows, PR - 1)  # clamped: finite scales for rows past the end
    if PC_DIV_GS and (GS % CT == 0):
        g = (rows_c * PC + col0) // GS
        w = (q.to(tl.float32) - tl.load(z_ptr + g)[:, None]) * tl.load(s_ptr + g)[:, None]
    else:
        s, z = group_scales(s_ptr, z_ptr, rows_c, cols, col0, PC, PR * PC, CT, GS, False)
        w = (q.to(tl.float32) - z) * s
    return tl.where(mask, w, 0.0)


@triton.jit
def _int4_mm_kernel(
    d_ptr, p_ptr, s_ptr, z_ptr, c_ptr, M, N, K, stride_d0, stride_d1, PR, PC,
    GS: tl.constexpr, P_IS_A: tl.constexpr, P_K_CONTIG: tl.constexpr, PC_DIV_GS: tl.constexpr,
    EVEN: tl.constexpr, DOT_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """fp32 ``C [M, N] = A @ B`` with P (packed INT4, ``(PR, PC)``) as A or B, the dense D the other.

    P_IS_A: A = P (``P[i, k]`` if P_K_CONTIG else ``P[k, i]``), D = B ``[K, N]`` with strides
    ``(stride_d0, stride_d1)``. Else B = P (``P[j, k]`` if P_K_CONTIG else ``P[k, j]``), D = A
    ``[M, K]``. C is contiguous. DOT_BF16: both operands are rounded to bf16 for the tensor cores
    (fp32 dense operands; see ``_matmul``), else P takes the dense operand's dtype.
    """
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + rk
        if P_IS_A:
            d_ptrs = d_ptr + offs_k[:, None] * stride_d0 + offs_n[None, :] * stride_d1
            d = tl.load(d_ptrs, mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
            if DOT_BF16:
                d = d.to(tl.bfloat16)
            if P_K_CONTIG:
                a = _p_tile(p_ptr, s_ptr, z_ptr, offs_m, k0, PR, PC, BLOCK_K, GS, PC_DIV_GS, EVEN)
            else:
                a = tl.trans(_p_tile(p_ptr, s_ptr, z_ptr, offs_k, pid_m * BLOCK_M, PR, PC, BLOCK_M, GS,
                                     PC_DIV_GS, EVEN))  # fmt: skip
            acc = tl.dot(a.to(d.dtype), d, acc)
        else:
            d_ptrs = d_ptr + offs_m[:, None] * stride_d0 + offs_k[None, :] * stride_d1
            d = tl.load(d_ptrs, mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            if DOT_BF16:
                d = d.to(tl.bfloat16)
            if P_K_CONTIG:
                b = tl.trans(_p_tile(p_ptr, s_ptr, z_ptr, offs_n, k0, PR, PC, BLOCK_K, GS, PC_DIV_GS, EVEN))
            else:
                b = _p_tile(p_ptr, s_ptr, z_ptr, offs_k, pid_n * BLOCK_N, PR, PC, BLOCK_N, GS, PC_DIV_GS,
                            EVEN)  # fmt: skip
            acc = tl.dot(d, b.to(d.dtype), acc)
    c_ptrs = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                         num_stages=stages)  # fmt: skip


# Low-rank sides are 128..1024 wide and the full sides thousands: mid-size tiles keep >= 1 wave
# of programs on 132 SMs without split-K (e.g. 4096 x 256 output -> 64 x 128 tiles = 128 programs).
_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),
    _cfg(64, 128, 64, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(128, 256, 64, 8, 3),
    _cfg(64, 128, 128, 4, 3),
    _cfg(64, 256, 64, 4, 3),
    _cfg(256, 64, 64, 8, 3),
    _cfg(128, 128, 128, 8, 3),
]
_KEY = ["M", "N", "K", "GS", "P_IS_A", "P_K_CONTIG", "PC_DIV_GS", "EVEN", "DOT_BF16"]
_mm_tuned = triton.autotune(_CONFIGS, key=_KEY, do_bench=do_bench)(_int4_mm_kernel)


_PATHS = ("auto", "fused", "dense")


def _use_dense(path: str, device: torch.device) -> bool:
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    if path == "auto":
        forced = os.environ.get("QGL_INT4_PROJECTION", "auto")
        path = forced if forced in _PATHS else "auto"
    if path == "auto":
        return device.type == "cuda" and not interpreting() and mm_fp32_out(device)
    return path == "dense"


def dense_basis_triton(packed: Tensor, scale: Tensor, zero: Tensor, p_shape: Sequence[int], group_size: int,
                       like: Tensor) -> Tensor | None:  # fmt: skip
    """P decoded to the 16-bit matrix that the dense path multiplies ``like`` (a gradient) with, or
    None where the projections take another path (fused kernel, tiny groups, no fp32-output mm).

    Both products of one update can then share one decoding: the dense path decodes P in every
    call, and on a GPU a launch costs more host time than the decoding costs the device.
    """
    # fp16 gradients: project decodes P to fp16, project_back to bf16 (no shared operand); fp64 ones
    # are rounded through fp32 by the products.
    if group_size < MIN_KERNEL_GROUP or like.dtype not in (torch.float32, torch.bfloat16) \
            or not _use_dense("auto", like.device):
        return None
    pr, pc = p_shape
    return dequantize_int4_triton(packed, scale, zero, (pr, pc), group_size, torch.bfloat16)


def _dense_matmul(dense: Tensor, packed, scale, zero, pr: int, pc: int, gs: int,
                  p_is_a: bool, p_k_contig: bool, out_dtype: torch.dtype) -> Tensor:  # fmt: skip
    """The dense path of ``_matmul``: P dequantized to 16 bits, one cuBLAS product (fp32
    accumulation) written in ``out_dtype``."""
    dtype = torch.float16 if dense.dtype == torch.float16 else torch.bfloat16
    p = dequantize_int4_triton(packed, scale, zero, (pr, pc), gs, dtype)
    d16 = dense.to(dtype)
    a, b = ((p if p_k_contig else p.T), d16) if p_is_a else (d16, (p.T if p_k_contig else p))
    return mm16(a, b, out_dtype)


def _matmul(dense: Tensor, packed, scale, zero, pr: int, pc: int, gs: int, m: int, n: int, k: int,
            p_is_a: bool, p_k_contig: bool, path: str = "auto",
            out_dtype: torch.dtype = torch.float32) -> Tensor:  # fmt: skip
    """``dense`` is A ``[m, k]`` (P is B) or B ``[k, n]`` (P is A); returns ``out_dtype [m, n]``
    (fp32 accumulation, one rounding; the fused kernel writes fp32, bf16 or fp16).

    fp32 dense operands are rounded to bf16 in registers for the dot (bf16 tensor cores; tf32
    would need K-major fp32 tiles in shared memory, which Triton cannot always arrange and then
    falls to a much slower path): a 2**-9 relative rounding, far below P's INT4 step. The
    interpreter keeps fp32 (it has no bf16 dot).
    """
    if dense.dtype not in _DENSE_DTYPES:
        dense = dense.to(torch.float32)
    if m and n and k and gs >= MIN_KERNEL_GROUP and _use_dense(path, dense.device):
        return _dense_matmul(dense, packed, scale, zero, pr, pc, gs, p_is_a, p_k_contig, out_dtype)
    if out_dtype not in _DENSE_DTYPES:  # e.g. fp64: computed in fp32 like every other path
        out32 = _matmul(dense, packed, scale, zero, pr, pc, gs, m, n, k, p_is_a, p_k_contig, path)
        return out32.to(out_dtype)
    out = _empty((m, n), dtype=out_dtype, device=dense.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    if gs < MIN_KERNEL_GROUP:  # tiny groups: dequantize P (small), then torch's fp32 matmul
        p = dequantize_int4_triton(packed, scale, zero, (pr, pc), gs, torch.float32)
        d32 = dense.to(torch.float32)
        if p_is_a:
            return out.copy_((p if p_k_contig else p.T) @ d32)
        return out.copy_(d32 @ (p.T if p_k_contig else p))  # copy_ rounds once to out_dtype
    args = (dense, packed, scale, zero, out, m, n, k, dense.stride(0), dense.stride(1), pr, pc)
    meta = dict(GS=gs, P_IS_A=p_is_a, P_K_CONTIG=p_k_contig, PC_DIV_GS=pc % gs == 0, EVEN=pc % 2 == 0,
                DOT_BF16=dense.dtype == torch.float32 and not interpreting())  # fmt: skip
    if interpreting() or os.environ.get("QGL_TRITON_AUTOTUNE") == "0":
        c = _CONFIGS[0]
        cfg, opts = (dict(INTERPRET_CONFIG), {}) if interpreting() else (dict(c.kwargs), c.all_kwargs())
        opts = {k: v for k, v in opts.items() if k in ("num_warps", "num_stages")}
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
        _int4_mm_kernel[grid](*args, **meta, **cfg, **opts)
    else:
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
        _mm_tuned[grid](*args, **meta)
    return out


def int4_project_triton(
    g: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    p_shape: Sequence[int],
    group_size: int,
    side: str,
    path: str = "auto",
) -> Tensor:
    """Project ``g [m, n]`` (fp32/bf16/fp16, any strides) by the packed P; fp32 result.

    ``side="right"``: P ``(r, n)``, returns ``g @ P^T`` ``(m, r)``. ``side="left"``: P ``(m, r)``,
    returns ``P^T @ g`` ``(r, n)``. ``path``: "fused" (the kernel), "dense" (dequantized P and
    cuBLAS) or "auto" (dense on a GPU; see the module docstring).
    """
    pr, pc = p_shape
    check_device(g, packed, scale, zero)
    check_numel(g.numel())
    check_numel(pr * pc)
    m, n = g.shape
    if side == "right":
        return _matmul(g, packed, scale, zero, pr, pc, group_size, m, pr, n, p_is_a=False, p_k_contig=True,
                       path=path)  # fmt: skip
    return _matmul(g, packed, scale, zero, pr, pc, group_size, pc, n, m, p_is_a=True, p_k_contig=False,
                   path=path)  # fmt: skip


def int4_project_back_triton(
    low: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    p_shape: Sequence[int],
    group_size: int,
    side: str,
    out_dtype: torch.dtype = torch.float32,
    path: str = "auto",
) -> Tensor:
    """Map ``low`` back through the packed P; ``(m, n)`` result in ``out_dtype``, fp32 accumulation.

    ``side="right"``: ``low (m, r) @ P (r, n)``. ``side="left"``: ``P (m, r) @ low (r, n)``.
    ``path`` as in ``int4_project_triton``. A bf16 ``out_dtype`` halves the bytes written, the
    larger part of this product's traffic at small rank (the full ``(m, n)`` output).
    """
    pr, pc = p_shape
    check_device(low, packed, scale, zero)
    check_numel(low.numel())
    check_numel(pr * pc)
    if side == "right":
        m = low.shape[0]
        return _matmul(low, packed, scale, zero, pr, pc, group_size, m, pc, pr, p_is_a=False,
                       p_k_contig=False, path=path, out_dtype=out_dtype)  # fmt: skip
    n = low.shape[1]
    return _matmul(low, packed, scale, zero, pr, pc, group_size, pr, n, pc, p_is_a=True, p_k_contig=True,
                   path=path, out_dtype=out_dtype)  # fmt: skip
