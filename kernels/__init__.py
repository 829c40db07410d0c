"""qgl.kernels: the quantization kernels, each a Triton kernel on CUDA and a plain-torch reference elsewhere.

Every public function here dispatches per call (``_dispatch.use_triton``): Triton for CUDA tensors
unless ``QGL_DISABLE_TRITON=1``, the ``*_ref`` reference otherwise. Each imports its Triton function
by name inside the ``if use_triton(...)`` branch (grep the name to find its one caller), so that
``import qgl.kernels`` never imports triton: CPU installs may lack it. Every entry point checks its
arguments here, once; the reference and the Triton wrapper they call trust them. The formats are
those of docs/internals.md: groups of ``group_size`` consecutive elements of the row-major flattening,
``n_groups = ceil(numel / group_size)``, fp32 scales and zero points.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._dispatch import use_triton
from ._groups import check_float_dtype, check_packed
from .int4_ref import (
    check_dequantize_int4,
    check_int4_projection,
    check_pack_int4,
    check_quantize_int4,
    dequantize_int4_ref,
    int4_project_back_ref,
    int4_project_ref,
    pack_int4_ref,
    quantize_int4_ref,
    unpack_int4_ref,
)
from .int8_ref import (
    check_dequantize_int8,
    check_device_scalars,
    check_int8_update,
    check_quantize_int8,
    dequantize_int8_ref,
    host_scalars,
    int8_update_ref,
    quantize_int8_ref,
)
from .w8a16_ref import check_w8a16, w8a16_grad_input_ref, w8a16_linear_ref

__all__ = [
    "use_triton",
    "quantize_int8",
    "dequantize_int8",
    "int8_update_",
    "quantize_int4",
    "dequantize_int4",
    "pack_int4",
    "unpack_int4",
    "int4_project",
    "int4_project_back",
    "int4_dense_basis",
    "w8a16_linear",
    "w8a16_grad_input",
]


# --- INT8 weights ------------------------------------------------------------------------------


def quantize_int8(
    w: Tensor, group_size: int = 256, symmetric: bool = True
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Round-to-nearest INT8 quantization of ``w`` (any floating dtype and shape), computed in fp32.

    Returns ``(q int8 [*w.shape], scale fp32 [n_groups], zero fp32 [n_groups] or None)``;
    ``zero`` is None iff ``symmetric``. Symmetric: ``w ~= q * scale``, q in -127..127;
    asymmetric: ``w ~= (q - zero) * scale``, q in -128..127, ``zero`` unrounded and unclamped.
    """
    check_quantize_int8(w, group_size)
    if use_triton(w):
        from .int8_triton import quantize_int8_triton

        return quantize_int8_triton(w, group_size, symmetric)
    return quantize_int8_ref(w, group_size, symmetric)


def dequantize_int8(
    q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, dtype: torch.dtype = torch.float32
) -> Tensor:
    """``(q - zero) * scale`` (``q * scale`` if ``zero`` is None), computed in fp32.

    ``q int8 [*shape]``, ``scale``/``zero`` fp32 ``[n_groups]`` -> ``dtype [*shape]``.
    """
    check_dequantize_int8(q, scale, zero, group_size, dtype)
    if use_triton(q):
        from .int8_triton import dequantize_int8_triton

        return dequantize_int8_triton(q, scale, zero, group_size, dtype)
    return dequantize_int8_ref(q, scale, zero, group_size, dtype)


def int8_update_(
    q: Tensor, scale: Tensor, zero: Tensor | None, delta: Tensor, decay: float | Tensor, group_size: int,
    seed: int, step: Tensor | None = None,
) -> None:
    """In place on ``q``, ``scale``, ``zero``: ``W <- SR(decay * dequant(W) + delta)``.

    ``q`` contiguous int8 ``[*shape]``, ``scale``/``zero`` fp32 ``[n_groups]`` (``zero`` None:
    symmetric), ``delta`` fp32 ``[*shape]``. Scales are recomputed from the updated fp32 values;
    stochastic rounding draws its uniforms from a generator keyed by ``seed`` (same seed, same
    bits on the same implementation and device). Non-finite ``delta`` is the caller's problem.

    Device scalars (what lets a CUDA graph replay the update while the step and the learning rate
    move): with ``step``, an int32/int64 tensor of one element on q's device, the key is ``(seed +
    step) mod 2**62`` (``seed`` in ``[0, 2**62)``) and ``decay`` is a one-element fp32 tensor on q's
    device; the kernel reads both when it runs. Same bits as the host numbers ``float(decay)`` and
    ``(seed + int(step)) % 2**62``. The references read them on the host.
    """
    check_int8_update(q, scale, zero, delta, group_size)
    if step is not None:
        check_device_scalars(q, decay, seed, step)
    if use_triton(q):
        from .int8_triton import int8_update_triton

        int8_update_triton(q, scale, zero, delta, decay, group_size, seed, step)
        return
    if step is not None:
        decay, seed = host_scalars(decay, seed, step)
    int8_update_ref(q, scale, zero, delta, float(decay), group_size, seed)


# --- INT4 projections ----------------------------------------------------------------------------


def quantize_int4(p: Tensor, group_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric round-to-nearest INT4 of ``p`` (any floating dtype and shape), computed in fp32.

    Returns ``(packed uint8 [ceil(numel / 2)], scale fp32 [n_groups], zero fp32 [n_groups])`` with
    ``p ~= (q - zero) * scale``, q in 0..15, two codes a byte (element 2k in the low nibble).
    """
    check_quantize_int4(p, group_size)
    if use_triton(p):
        from .int4_format_triton import quantize_int4_triton

        return quantize_int4_triton(p, group_size)
    return quantize_int4_ref(p, group_size)


def dequantize_int4(
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    shape: Sequence[int],
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``(q - zero) * scale`` from packed codes, computed in fp32.

    ``packed uint8 [ceil(numel / 2)]``, ``scale``/``zero`` fp32 ``[n_groups]`` -> ``dtype [*shape]``.
    """
    shape = check_dequantize_int4(packed, scale, zero, shape, group_size, dtype)
    if use_triton(packed):
        from .int4_format_triton import dequantize_int4_triton

        return dequantize_int4_triton(packed, scale, zero, shape, group_size, dtype)
    return dequantize_int4_ref(packed, scale, zero, shape, group_size, dtype)


def pack_int4(q: Tensor) -> Tensor:
    """Pack uint8 codes 0..15 (any shape, row-major) two to a byte: -> ``uint8 [ceil(numel / 2)]``."""
    check_pack_int4(q)
    if use_triton(q):
        from .int4_format_triton import pack_int4_triton

        return pack_int4_triton(q)
    return pack_int4_ref(q)


def unpack_int4(packed: Tensor, numel: int) -> Tensor:
    """Unpack ``uint8 [ceil(numel / 2)]`` into ``uint8 [numel]`` codes 0..15."""
    check_packed(packed, numel)
    if use_triton(packed):
        from .int4_format_triton import unpack_int4_triton

        return unpack_int4_triton(packed, numel)
    return unpack_int4_ref(packed, numel)


def int4_project(
    g: Tensor, packed: Tensor, scale: Tensor, zero: Tensor, p_shape: Sequence[int], group_size: int, side: str
) -> Tensor:
    """Low-rank projection of ``g [m, n]`` by the packed INT4 P, returned in fp32.

    ``side="right"``: P ``(r, n)``, returns ``g @ P^T`` ``(m, r)``; ``side="left"``: P ``(m, r)``,
    returns ``P^T @ g`` ``(r, n)``.
    """
    p_shape = check_int4_projection(g, packed, scale, zero, p_shape, group_size, side, back=False)
    if use_triton(g):
        from .int4_triton import int4_project_triton

        return int4_project_triton(g, packed, scale, zero, p_shape, group_size, side)
    return int4_project_ref(g, packed, scale, zero, p_shape, group_size, side)


def int4_project_back(
    low: Tensor,
    packed: Tensor,
    scale: Tensor,
    zero: Tensor,
    p_shape: Sequence[int],
    group_size: int,
    side: str,
    out_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Back-projection to ``(m, n)`` through the packed INT4 P: fp32 accumulation, returned in
    ``out_dtype`` (rounded once).

    ``side="right"``: ``low (m, r) @ P (r, n)``; ``side="left"``: ``P (m, r) @ low (r, n)``.
    """
    check_float_dtype(out_dtype)
    p_shape = check_int4_projection(low, packed, scale, zero, p_shape, group_size, side, back=True)
    if use_triton(low):
        from .int4_triton import int4_project_back_triton

        return int4_project_back_triton(low, packed, scale, zero, p_shape, group_size, side, out_dtype)
    return int4_project_back_ref(low, packed, scale, zero, p_shape, group_size, side, out_dtype)


def int4_dense_basis(
    packed: Tensor, scale: Tensor, zero: Tensor, p_shape: Sequence[int], group_size: int, like: Tensor
) -> Tensor | None:
    """P as the bf16 ``[*p_shape]`` matrix that ``int4_project``/``int4_project_back`` would decode for
    a gradient like ``like`` on its device, or None where they do not decode it (the references on
    CPU, the fused kernel, fp16 gradients). ``mm16`` with it gives those functions' results exactly.
    """
    if use_triton(like):
        p_shape = check_int4_projection(like, packed, scale, zero, p_shape, group_size, None, back=False)
        from .int4_triton import dense_basis_triton

        return dense_basis_triton(packed, scale, zero, p_shape, group_size, like)
    return None


# --- INT8-weight linear ----------------------------------------------------------------------------


def w8a16_linear(
    x: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, bias: Tensor | None = None
) -> Tensor:
    """``x @ dequant(W)^T + bias``: ``x [..., in]``, ``q int8 [out, in]``, ``bias [out]`` -> ``[..., out]``.

    W is dequantized in fp32 and rounded once to ``x.dtype``; the matmul and the result are in
    ``x.dtype`` (``bias`` is cast to it).
    """
    check_w8a16("x", x, q, scale, zero, group_size, 1)
    if use_triton(x):
        from .w8a16_triton import w8a16_linear_triton

        return w8a16_linear_triton(x, q, scale, zero, group_size, bias)
    return w8a16_linear_ref(x, q, scale, zero, group_size, bias)


def w8a16_grad_input(dy: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int) -> Tensor:
    """``dy @ dequant(W)``: ``dy [..., out]``, ``q int8 [out, in]`` -> ``dy.dtype [..., in]``."""
    check_w8a16("dy", dy, q, scale, zero, group_size, 0)
    if use_triton(dy):
        from .w8a16_triton import w8a16_grad_input_triton

        return w8a16_grad_input_triton(dy, q, scale, zero, group_size)
    return w8a16_grad_input_ref(dy, q, scale, zero, group_size)
