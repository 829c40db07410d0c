"""Matrix products on shapes padded to 16 bytes, for cuBLAS's fast kernels.

cuBLAS runs its Hopper GEMM kernels (TMA loads) only on 16-byte aligned operands; otherwise it falls
back to sm75-era kernels (``cutlass_75_tensorop_bf16_s1688gemm``). LLaMA-1B's MLP is 5461 wide
(GaLore's config): every product with a 5461-wide bf16 operand or output has rows of 10,922 bytes,
and the fallback took 216 of bf16 AdamW's 311 ms of device time a step on an H100
(benchmarks/results/gpu_h100_2026-12-07c.md).

Alignment asks for both the strides and the extent of each operand's contiguous dimension to be
multiples of 16 bytes (CUTLASS's ``check_alignment`` tests both; cuBLAS's rule is not published). So
``mm`` pads the product itself: the reduced dimension k with zeros in both operands (a sum over extra
zero products is the same sum), and m and n with rows and columns whose results it drops; then the
product runs on ``[mp, kp] @ [kp, np]`` and the ``[m, n]`` result is copied out contiguous (callers
and autograd expect nn.Linear's contiguous result; a slice of whole rows already is). Each copy is one
pass over memory, paid only on CUDA, only where a dimension is unaligned, and only for products large
enough (``ALIGN_MIN_FLOPS``) that the slow kernel costs more than the copies. Same math as ``a @ b``
but for the kernels' summation order. ``python benchmarks/aligned_gemm.py`` times both on LLaMA-1B's
shapes and names the kernel cuBLAS picked for each.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ALIGN_BYTES", "ALIGN_MIN_FLOPS", "multiple", "mm", "linear", "matmul"]

ALIGN_BYTES = 16
# From here a product is worth its copies: LLaMA-1B's MLP at 512 tokens is 11 GFLOP; at 64 tokens
# (1.4 GFLOP) the copies would cost about what the faster kernel saves.
ALIGN_MIN_FLOPS = 2**33
_empty = torch.empty  # every padded buffer is allocated here (tests poison it)


def multiple(dtype: torch.dtype) -> int:
    """Elements in 16 bytes of ``dtype``: the multiple every padded dimension is rounded up to."""
    return max(1, ALIGN_BYTES // dtype.itemsize)


def _up(size: int, step: int) -> int:
    return -(-size // step) * step


def _padded(t: Tensor, rows: int, cols: int, zero_rows: bool, zero_cols: bool) -> Tensor:
    """``t [r, c]`` in a new ``[rows, cols]`` matrix of the same major order (a column-major ``t``, such
    as a transposed weight, stays so: the copy does not transpose). The added rows / columns are
    zeros where asked (the reduced dimension), else left unwritten (their results are dropped)."""
    if t.stride(0) == 1 and t.stride(1) != 1:  # column-major: pad its transpose
        return _padded(t.t(), cols, rows, zero_cols, zero_rows).t()
    r, c = t.shape
    if (r, c) == (rows, cols) and t.is_contiguous() and t.data_ptr() % ALIGN_BYTES == 0:
        return t
    out = _empty(rows, cols, dtype=t.dtype, device=t.device)
    out[:r, :c].copy_(t)
    if zero_cols and cols > c:
        out[:r, c:].zero_()
    if zero_rows and rows > r:
        out[r:].zero_()
    return out


def _pad_step(m: int, k: int, n: int, a: Tensor, force: bool) -> int:
    """The multiple to pad ``[m, k] @ [k, n]`` to, or 0 for the plain product: on CPU, under
    ``ALIGN_MIN_FLOPS`` (unless ``force``) and where every dimension is already aligned. Called once a
    product, on the host's hot path: shapes and flags only, no tensor made."""
    if not (force or (a.is_cuda and 2 * m * n * k >= ALIGN_MIN_FLOPS)):
        return 0
    step = multiple(a.dtype)
    return step if (m % step or k % step or n % step) else 0


def _differentiable(a: Tensor, b: Tensor) -> bool:
    return torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)


def mm(a: Tensor, b: Tensor, force: bool = False) -> Tensor:
    """``a [m, k] @ b [k, n]`` -> contiguous ``[m, n]`` in their dtype, on shapes padded to 16 bytes.

    As ``a @ b`` on CPU, under ``ALIGN_MIN_FLOPS``, under autograd (the graph would keep the padded
    copies alive for the backward; QLinear calls it inside its own backward) and when every
    dimension is already a multiple of 16 bytes (``force``: pad anyway, for tests and benchmarks).
    """
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"mm takes two 2-D matrices, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    (m, k), n = a.shape, b.shape[1]
    step = _pad_step(m, k, n, a, force)
    if not step or _differentiable(a, b):
        return a @ b
    return _padded_mm(a, b, step)


def _padded_mm(a: Tensor, b: Tensor, step: int) -> Tensor:
    (m, k), n = a.shape, b.shape[1]
    mp, kp, np_ = _up(m, step), _up(k, step), _up(n, step)
    out = _padded(a, mp, kp, zero_rows=False, zero_cols=True) @ _padded(
        b, kp, np_, zero_rows=True, zero_cols=False
    )
    if np_ == n:
        return out[:m]  # whole rows: contiguous
    return out[:m, :n].contiguous()


def linear(x: Tensor, w: Tensor, bias: Tensor | None = None, force: bool = False) -> Tensor:
    """``F.linear(x, w, bias)`` through the padded product: ``x [..., k]``, ``w [n, k]`` -> ``[..., n]``.
    Aligned shapes (LLaMA-7B's) and the cases ``mm`` leaves plain get torch's own call."""
    n, k = w.shape
    step = _pad_step(x.numel() // max(k, 1), k, n, x, force)
    if not step or _differentiable(x, w):
        return torch.nn.functional.linear(x, w, bias)
    y = _padded_mm(x.reshape(-1, k), w.t(), step)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], n)


def matmul(a: Tensor, b: Tensor, force: bool = False) -> Tensor:
    """``a [..., k] @ b [k, n]`` -> ``[..., n]`` through the padded product (plain where ``mm`` is)."""
    k, n = b.shape
    step = _pad_step(a.numel() // max(k, 1), k, n, a, force)
    if not step or _differentiable(a, b):
        return a @ b
    return _padded_mm(a.reshape(-1, k), b, step).view(*a.shape[:-1], n)
