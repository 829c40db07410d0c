"""``mm16``: the product of two 16-bit matrices with fp32 accumulation, in any output dtype.

The dense paths of the INT4 projections and the float GaLore projector on 16-bit gradients use it:
one cuBLAS call at bf16 tensor-core speed (``torch.mm(out_dtype=torch.float32)``, torch >= 2.8),
rounded once to ``out_dtype``. Where that is missing, the same math in fp32: a product of two 16-bit
values is exact in fp32, so only the summation order differs.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor


@functools.cache
def mm_fp32_out(device: torch.device) -> bool:
    """Whether ``torch.mm(a16, b16, out_dtype=torch.float32)`` runs on ``device``."""
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    try:
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def mm16(a: Tensor, b: Tensor, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``a [m, k] @ b [k, n]`` for 16-bit ``a`` and ``b`` of one dtype: fp32 accumulation, ``out_dtype``."""
    if a.dtype != b.dtype or a.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"mm16 takes two bf16 or two fp16 matrices, got {a.dtype} and {b.dtype}")
    if out_dtype == a.dtype and a.is_cuda:
        return torch.mm(a, b)  # cuBLAS accumulates in fp32 and rounds once
    if mm_fp32_out(a.device):
        return torch.mm(a, b, out_dtype=torch.float32).to(out_dtype)
    return (a.float() @ b.float()).to(out_dtype)
