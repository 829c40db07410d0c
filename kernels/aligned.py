"""Matrix products whose operands and output have 16-byte aligned rows, for cuBLAS's fast kernels.

cuBLAS runs its Hopper (TMA) GEMM kernels only when every operand's leading dimension and base
address are multiples of 16 bytes; otherwise it falls back to sm75-era kernels
(``cutlass_75_tensorop_bf16_s1688gemm``). LLaMA-1B's MLP is 5461 wide (GaLore's config): every
product with a 5461-wide bf16 operand has rows of 10,922 bytes, and those fallback kernels took 216
of bf16 AdamW's 311 ms of device time a step on an H100 (benchmarks/results/gpu_h100_2026-12-07c.md).

The sizes M, N, K may be anything; only the strides matter. So an unaligned operand is copied into a
buffer whose rows are padded to 16 bytes and viewed back at its own shape (the padding is never
read), and an unaligned output is written into such a buffer, then copied out contiguous (callers
and autograd expect nn.Linear's contiguous result). Each copy is one pass over memory, paid only on
CUDA, only where a row is unaligned, and only for products large enough (``ALIGN_MIN_FLOPS``) that
the slower kernel costs more than the copies. Same math as ``a @ b``: the result differs only by the
kernels' summation order. ``python benchmarks/aligned_gemm.py`` times both on LLaMA-1B's shapes.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ALIGN_BYTES", "ALIGN_MIN_FLOPS", "is_aligned", "aligned", "mm", "linear", "matmul"]

ALIGN_BYTES = 16
# From here a product is worth two copies: LLaMA-1B's MLP at 512 tokens is 11 GFLOP, ~8x its copies'
# time in the slow kernel's extra; at 64 tokens (1.4 GFLOP) the copies would cost about what they save.
ALIGN_MIN_FLOPS = 2**33


def _row_aligned(stride: int, itemsize: int) -> bool:
    return stride * itemsize % ALIGN_BYTES == 0


def is_aligned(t: Tensor) -> bool:
    """Whether the 2-D ``t`` is a cuBLAS operand as it is: one unit stride (row- or column-major),
    the other stride a multiple of 16 bytes, the base address 16-byte aligned."""
    if t.data_ptr() % ALIGN_BYTES:
        return False
    rows, cols = t.shape
    s0, s1 = t.stride()
    if s1 == 1 or cols == 1:
        return rows == 1 or _row_aligned(s0, t.element_size())
    if s0 == 1 or rows == 1:
        return _row_aligned(s1, t.element_size())
    return False


def _padded_empty(rows: int, cols: int, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """An uninitialized ``[rows, cols]`` view with rows padded to 16 bytes (row-major)."""
    dtype = dtype or like.dtype
    per_row = ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
    padded = -(-cols // per_row) * per_row
    return torch.empty(rows, padded, dtype=dtype, device=like.device)[:, :cols]


def aligned(t: Tensor) -> Tensor:
    """The 2-D ``t`` itself if ``is_aligned``, else a copy with padded rows (same shape; a column-major
    ``t`` gives a column-major copy, so that the copy does not transpose)."""
    if is_aligned(t):
        return t
    if t.stride(0) == 1 and t.stride(1) != 1:  # column-major (a transposed matrix): stays so, untransposed
        return aligned(t.t()).t()
    out = _padded_empty(*t.shape, like=t)
    out.copy_(t)
    return out


def _worth_it(a: Tensor, b: Tensor) -> bool:
    m, k = a.shape
    n = b.shape[1]
    return a.is_cuda and 2 * m * n * k >= ALIGN_MIN_FLOPS


def _differentiable(a: Tensor, b: Tensor) -> bool:
    # `torch.mm(out=...)` refuses inputs that autograd tracks: those take `a @ b` as they are.
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)


def mm(a: Tensor, b: Tensor, force: bool = False) -> Tensor:
    """``a [m, k] @ b [k, n]`` -> contiguous ``[m, n]`` in their dtype, on aligned operands.

    As ``a @ b`` on CPU and for products under ``ALIGN_MIN_FLOPS`` (``force``: align anyway, for
    tests and benchmarks). The output goes through a padded buffer only when an ``n``-wide row is
    unaligned.
    """
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"mm takes two 2-D matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if (
        not (force or _worth_it(a, b))
        or _differentiable(a, b)
        or (is_aligned(a) and is_aligned(b) and _row_aligned(b.shape[1], a.element_size()))
    ):
        return a @ b
    a, b = aligned(a), aligned(b)
    m, n = a.shape[0], b.shape[1]
    if _row_aligned(n, a.element_size()):
        return a @ b
    out = _padded_empty(m, n, like=a)
    torch.mm(a, b, out=out)
    return out.contiguous()


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None, force: bool = False) -> Tensor:
    """``F.linear(x, w, bias)`` on aligned operands: ``x [..., k]``, ``w [n, k]`` -> ``[..., n]``."""
    k, n = w.shape[1], w.shape[0]
    x2 = x.reshape(-1, k)
    if not (force or _worth_it(x2, w.t())):
        return torch.nn.functional.linear(x, w, bias)
    y = mm(x2, w.t(), force=True)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)


def matmul(a: Tensor, b: Tensor, force: bool = False) -> Tensor:
    """``a [..., k] @ b [k, n]`` -> ``[..., n]`` on aligned operands."""
    k, n = b.shape
    a2 = a.reshape(-1, k)
    if not (force or _worth_it(a2, b)):
        return a @ b
    return mm(a2, b, force=True).view(*a.shape[:-1], n)
