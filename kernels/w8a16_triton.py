"""Triton matmuls with an INT8 weight and 16-bit (or fp32) activations (``w8a16_ref.py``).

``q: int8 [out, in]`` with fp32 ``scale``/``zero`` per group of ``group_size`` consecutive
elements of the row-major flattening (docs/internals.md); a group may span rows when ``in`` is
not a multiple of ``group_size``, so an element's group is ``(row * in + col) // group_size``.

Both kernels load W tiles as int8 (half the bytes of bf16), dequantize them in registers exactly
like the reference (``(q - zero) * scale`` in fp32, rounded once to the activation dtype) and
accumulate in fp32 with ``tl.dot`` (fp32 activations: tf32 tensor cores, Triton's default).

- fast path: ``BLOCK_K`` divides both ``in`` and ``group_size`` -> a K tile of a W row starts at a
  flat offset that is a multiple of ``BLOCK_K`` and group boundaries are multiples of it too, so the
  tile lies in one group (also when groups span rows, e.g. LLaMA-1B's in = 5504 = 21.5 groups of
  256): the scales are a ``[BLOCK_N]`` vector per tile (one load per row);
- general path: per element, a select among the few group vectors a tile row spans (any shape,
  groups >= ``MIN_KERNEL_GROUP``; tinier groups dequantize W and use torch's matmul).

``SWAP`` computes the transposed tile (``W @ x^T``) so that the dequantized W is the left
operand: on Hopper the left wgmma operand may stay in registers and the small token count
becomes the instruction's N (>= 8) rather than its M (>= 64), which suits decode-like shapes.
The autotuner picks ``SWAP`` and the tile per (M bucket, N, K, group size).

``SPLIT_K`` (decode-like configs only) splits the reduction over ``SPLIT_K`` programs per output
tile: with few tokens there is one row of tiles, e.g. 32 tiles of 64 columns for a 2048-wide
output, too few to keep 132 SMs streaming W. Each split writes its fp32 partial tile to a
workspace ``[SPLIT_K, M, N_out]`` and the wrapper sums the slices in a fixed order (no atomics:
the result is deterministic), then adds the bias and rounds once to the activation dtype.

Training-sized token counts (``M >= dense_min_m()``, default ``DENSE_MIN_M``) take the *dense*
path instead: W is dequantized into a transient ``x.dtype`` matrix (``_decode``: one torch op for
symmetric W, else ``dequantize_int8_triton``; ~3 bytes an element) and the product runs in cuBLAS, on
shapes padded to 16 bytes (``kernels/aligned.py``: a 5461-wide W would get a slow kernel).
There the matmul is compute-bound and cuBLAS's Hopper kernels beat the fused kernel, whose int8 ->
bf16 conversion sits in the wgmma loop, by far more than the dequantization costs
(benchmarks/kernels_bench.py prints both). The transient is one layer's weight, freed when the product
returns. Same math as the reference either way: W dequantized in fp32, rounded once to the activation dtype.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import aligned
from ._bench import do_bench
from ._tiles import group_scales, swizzle
from .int8_triton import check_device, check_numel, dequantize_int8_triton, interpreting
from .w8a16_ref import w8a16_grad_input_ref, w8a16_linear_ref

__all__ = ["w8a16_linear_triton", "w8a16_grad_input_triton"]

_ACT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_K_ALIGN = 128  # every config's reduction block divides this: "K % 128 == 0" means no K masks
MIN_KERNEL_GROUP = 32  # smaller groups: dequantize W, then torch's matmul (as the reference does)
DENSE_MIN_M = 512  # tokens from which "auto" dequantizes W and calls cuBLAS (H100: see README)
_PATHS = ("auto", "fused", "dense")
_empty = torch.empty  # every output allocation goes through here (tests poison it)
# Used under TRITON_INTERPRET=1 (the autotuner needs a GPU); tests may change it.
INTERPRET_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2, "SWAP": False, "SPLIT_K": 1}


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int, swap: bool, split: int = 1) -> triton.Config:
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "SWAP": swap, "SPLIT_K": split}
    return triton.Config(meta, num_warps=warps, num_stages=stages)


# Decode-like (M <= 64): stream W once, few tokens; swapped tiles keep the tokens as wgmma's N;
# split-K configs for outputs too narrow to give every SM a tile.
_SMALL_M = [
    _cfg(16, 64, 128, 4, 4, True),
    _cfg(16, 128, 128, 4, 4, True),
    _cfg(32, 64, 128, 4, 4, True),
    _cfg(64, 128, 64, 4, 4, True),
    _cfg(16, 64, 128, 4, 4, False),
    _cfg(32, 128, 64, 4, 4, False),
    _cfg(16, 64, 128, 4, 4, True, 2),
    _cfg(16, 64, 128, 4, 4, True, 4),
    _cfg(16, 64, 128, 4, 4, True, 8),
    _cfg(16, 128, 128, 4, 4, True, 4),
    _cfg(32, 64, 128, 4, 4, True, 4),
]
MAX_SPLIT_K = 8  # the largest SPLIT_K of any config: the workspace's first dimension
# Training-like (M > 64): large tiles for tensor-core throughput.
_LARGE_M = [
    _cfg(128, 128, 64, 8, 4, False),
    _cfg(128, 256, 64, 8, 3, False),
    _cfg(128, 128, 64, 8, 4, True),
    _cfg(256, 128, 64, 8, 3, True),
    _cfg(64, 128, 64, 4, 4, False),
    _cfg(128, 64, 64, 4, 4, False),
    _cfg(128, 256, 64, 8, 4, True),
    _cfg(128, 128, 128, 8, 3, False),
    _cfg(256, 128, 128, 8, 2, True),
]


def _prune(configs, named_args, **kwargs):
    """Keep the configs of the M bucket (the autotuner's key): small-M or large-M tiles."""
    m_bucket = kwargs.get("M_BUCKET", named_args.get("M_BUCKET", 1 << 20))
    small = m_bucket <= 64
    return [c for c in configs if (c in _SMALL_M) == small] or list(configs)


def _pow2_divisor(k: int) -> int:
    """The largest power of two dividing ``k``, capped at 1024 (above every block size): with the
    group size, it tells whether a block-aligned tile row can cross a group boundary."""
    return min(k & -k, 1024) if k else 1024


def _m_bucket(m: int) -> int:
    """Autotuning key for the token count: powers of two up to 4096 (decode M changes often)."""
    return min(triton.next_power_of_2(max(m, 1)), 4096)


@triton.jit
def _dequant_tile(q, s_ptr, z_ptr, rows, cols, col0, K, NK, FAST: tl.constexpr,
                  SYMMETRIC: tl.constexpr, GS: tl.constexpr, C: tl.constexpr):  # fmt: skip
    """fp32 ``(q - zero) * scale`` of an int8 tile ``q [R, C]`` of W at ``rows [R]`` x ``cols [C]``.

    FAST: ``cols`` lie in one group per row (group ``(row * K + col0) // GS``). ``NK`` = N * K.
    Out-of-range entries get finite values.
    """
    if FAST:
        g = (rows * K + col0) // GS
        s = tl.load(s_ptr + g)[:, None]
        if SYMMETRIC:
            return q.to(tl.float32) * s
        return (q.to(tl.float32) - tl.load(z_ptr + g)[:, None]) * s
    s, z = group_scales(s_ptr, z_ptr, rows, cols, col0, K, NK, C, GS, SYMMETRIC)
    if SYMMETRIC:
        return q.to(tl.float32) * s
    return (q.to(tl.float32) - z) * s


@triton.jit
def _split_range(total, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """``[lo, hi)`` of the reduction this program's split covers: ``cdiv(total, SPLIT_K)`` rounded up
    to whole blocks (so an even reduction stays even per split); trailing splits may be empty."""
    length = tl.cdiv(tl.cdiv(total, SPLIT_K), BLOCK) * BLOCK
    lo = tl.program_id(1) * length
    return lo, tl.minimum(total, lo + length)


@triton.jit
def _store_tile(out_ptr, ws_ptr, acc, offs_m, offs_c, M, C, SPLIT_K: tl.constexpr):
    """Store the fp32 tile ``acc`` at ``[offs_m, offs_c]`` of ``out [M, C]`` (rounded to its dtype),
    or, split, to this split's slice of ``ws [SPLIT_K, M, C]``."""
    mask = (offs_m[:, None] < M) & (offs_c[None, :] < C)
    tile = offs_m[:, None] * C + offs_c[None, :]
    if SPLIT_K > 1:
        tl.store(ws_ptr + tl.program_id(1).to(tl.int64) * M * C + tile, acc, mask=mask)
    else:
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _w8a16_fwd_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, b_ptr, y_ptr, ws_ptr, M, N, K, stride_xm,
    M_BUCKET, GS: tl.constexpr, K_P2: tl.constexpr, EVEN_K: tl.constexpr,
    SYMMETRIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """``y [M, N] = x [M, K] @ dequant(q [N, K])^T (+ bias)``, fp32 accumulation, y in x's dtype.

    ``SPLIT_K > 1``: program ``(tile, s)`` reduces over its share of K and stores the fp32 partial
    (no bias) to ``ws [SPLIT_K, M, N]`` slice ``s``; the wrapper sums the slices.
    """
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    k_lo, k_hi = _split_range(K, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rm = offs_m % M  # wrapped rows/cols load valid memory; they are never stored
    rn = offs_n % N
    x_ptrs = x_ptr + rm[:, None] * stride_xm + (k_lo + rk)[None, :]
    q_ptrs = q_ptr + rn[:, None] * K + (k_lo + rk)[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kmask = (k0 + rk)[None, :] < k_hi
        if EVEN_K:
            x = tl.load(x_ptrs)
            q = tl.load(q_ptrs)
        else:
            x = tl.load(x_ptrs, mask=kmask, other=0.0)
            q = tl.load(q_ptrs, mask=kmask, other=0)
        w = _dequant_tile(q, s_ptr, z_ptr, rn, k0 + rk, k0, K, N * K,
                          (K_P2 % BLOCK_K == 0) and (GS % BLOCK_K == 0), SYMMETRIC, GS,
                          BLOCK_K).to(x.dtype)  # fmt: skip
        if SWAP:  # noqa: SIM108 (a compile-time branch: Triton specializes it away)
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    if HAS_BIAS and SPLIT_K == 1:  # split: the wrapper adds it once, after the sum
        acc += tl.load(b_ptr + rn).to(tl.float32)[None, :]
    _store_tile(y_ptr, ws_ptr, acc, offs_m, offs_n, M, N, SPLIT_K)


@triton.jit(do_not_specialize=["M_BUCKET"])
def _w8a16_bwd_kernel(
    dy_ptr, q_ptr, s_ptr, z_ptr, dx_ptr, ws_ptr, M, N, K, stride_dym,
    M_BUCKET, GS: tl.constexpr, K_P2: tl.constexpr, EVEN_K: tl.constexpr,
    SYMMETRIC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    """``dx [M, K] = dy [M, N] @ dequant(q [N, K])``: output tiles over (M, K), reduction over N.

    Here ``BLOCK_N`` is the output tile along K (W's columns) and ``BLOCK_K`` the reduction
    block along N (W's rows), so the same configs serve both kernels; ``EVEN_K`` means N % 128.
    ``SPLIT_K > 1`` splits the reduction over N, partials to ``ws [SPLIT_K, M, K]`` (as forward).
    """
    pid_m, pid_c = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_N), GROUP_M)
    n_lo, n_hi = _split_range(N, SPLIT_K, BLOCK_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = W columns
    rr = tl.arange(0, BLOCK_K)  # reduction = W rows
    rm = offs_m % M
    rc = offs_c % K
    dy_ptrs = dy_ptr + rm[:, None] * stride_dym + (n_lo + rr)[None, :]
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for n0 in range(n_lo, n_hi, BLOCK_K):
        rows = n0 + rr
        q_ptrs = q_ptr + rows[:, None] * K + rc[None, :]
        if EVEN_K:
            dy = tl.load(dy_ptrs)
            q = tl.load(q_ptrs)
        else:
            rmask = rows[:, None] < n_hi
            dy = tl.load(dy_ptrs, mask=(rows < n_hi)[None, :], other=0.0)
            q = tl.load(q_ptrs, mask=rmask, other=0)
        # Rows past N: masked loads (finite), dy is 0 there. Wrapped columns are never stored.
        w = _dequant_tile(q, s_ptr, z_ptr, tl.minimum(rows, N - 1), rc, pid_c * BLOCK_N, K, N * K,
                          (K_P2 % BLOCK_N == 0) and (GS % BLOCK_N == 0), SYMMETRIC, GS,
                          BLOCK_N).to(dy.dtype)  # fmt: skip
        if SWAP:  # noqa: SIM108 (a compile-time branch)
            acc = tl.dot(tl.trans(w), tl.trans(dy), acc)
        else:
            acc = tl.dot(dy, w, acc)
        dy_ptrs += BLOCK_K
    if SWAP:
        acc = tl.trans(acc)
    _store_tile(dx_ptr, ws_ptr, acc, offs_m, offs_c, M, K, SPLIT_K)


_KEY = ["M_BUCKET", "N", "K", "GS", "SYMMETRIC"]
_fwd_tuned = triton.autotune(_SMALL_M + _LARGE_M, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                             do_bench=do_bench)(
    _w8a16_fwd_kernel
)
_bwd_tuned = triton.autotune(_SMALL_M + _LARGE_M, key=_KEY, prune_configs_by={"early_config_prune": _prune},
                             do_bench=do_bench)(
    _w8a16_bwd_kernel
)


def _launch(tuned, kernel, args: tuple, m: int, n_out: int, meta: dict) -> int:
    """Autotuned launch on a GPU; a fixed config under the interpreter or ``QGL_TRITON_AUTOTUNE=0``.

    ``M_BUCKET`` is an ordinary (unspecialized) argument used only as the autotuner's key.
    Returns the launched config's ``SPLIT_K`` (the autotuner records its pick per call).
    """
    if interpreting() or os.environ.get("QGL_TRITON_AUTOTUNE") == "0":
        if interpreting():
            cfg, opts = dict(INTERPRET_CONFIG), {}
        else:
            c = (_SMALL_M if meta["M_BUCKET"] <= 64 else _LARGE_M)[0]
            cfg, opts = dict(c.kwargs), {"num_warps": c.num_warps, "num_stages": c.num_stages}
        cfg.setdefault("SPLIT_K", 1)
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n_out, cfg["BLOCK_N"]), cfg["SPLIT_K"])
        kernel[grid](*args, **meta, **cfg, **opts)
        return cfg["SPLIT_K"]
    grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n_out, c["BLOCK_N"]), c["SPLIT_K"])
    tuned[grid](*args, **meta)
    return tuned.best_config.kwargs["SPLIT_K"]


def _workspace(m: int, n_out: int, device: torch.device) -> Tensor:
    """fp32 ``[MAX_SPLIT_K, m, n_out]`` for split-K partials (decode-sized m only: a few MB).
    Large-M configs never split, so they get a 1-element placeholder."""
    if _m_bucket(m) > 64 and not interpreting():
        return _empty(1, dtype=torch.float32, device=device)
    return _empty((MAX_SPLIT_K, m, n_out), dtype=torch.float32, device=device)


def _reduce_splits(out: Tensor, ws: Tensor, split: int, bias: Tensor | None = None) -> None:
    """``out = sum(ws[:split]) (+ bias)`` in fp32, rounded once to out's dtype. torch's reduction
    has no atomics: the same inputs give the same bits."""
    if split == 1:
        return
    acc = ws[:split].sum(0)
    if bias is not None:
        acc += bias.float()
    out.copy_(acc)


def dense_min_m() -> int:
    """Token count from which ``path="auto"`` takes the dense path: env ``QGL_W8A16_DENSE_MIN_M``,
    else ``DENSE_MIN_M`` (read per call, so that benchmarks and tests can move it)."""
    env = os.environ.get("QGL_W8A16_DENSE_MIN_M")
    return int(env) if env else DENSE_MIN_M


def _dense(path: str, m: int, group_size: int) -> bool:
    if path not in _PATHS:
        raise ValueError(f"path must be one of {_PATHS}, got {path!r}")
    return group_size < MIN_KERNEL_GROUP or path == "dense" or (path == "auto" and m >= dense_min_m())


def _decode(q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, dtype: torch.dtype) -> Tensor:
    """W for the dense path, ``dtype [out, in]``: ``q * scale`` computed in fp32, rounded once.

    Symmetric W in whole groups is one torch op (int8 x fp32 in fp32, written in ``dtype``): the
    dense path decodes every matrix three times a step under activation checkpointing, and a
    Triton launch costs several times an aten op's host time (benchmarks/overhead.py), which a
    training step bound by its host pays in full. Same bits as ``dequantize_int8_triton``.
    """
    if zero is not None or q.numel() % group_size or not q.is_contiguous():
        return dequantize_int8_triton(q, scale, zero, group_size, dtype)
    out = _empty(q.shape, dtype=dtype, device=q.device)
    torch.mul(q.view(-1, group_size), scale.view(-1, 1), out=out.view(-1, group_size))
    return out


def _check(name: str, a: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, dim: int):
    # The arguments were checked by the entry point (w8a16_ref.check_w8a16); these are the kernel's limits.
    check_device(a, q, scale, zero)
    check_numel(q.numel())
    check_numel(a.numel())


def w8a16_linear_triton(
    x: Tensor,
    q: Tensor,
    scale: Tensor,
    zero: Tensor | None,
    group_size: int,
    bias: Tensor | None = None,
    path: str = "auto",
) -> Tensor:
    """``x @ dequant(W)^T + bias``: ``x [..., in]`` (fp32/bf16/fp16), ``q int8 [out, in]`` -> ``[..., out]``.

    Result in ``x.dtype``; ``bias [out]`` is cast to ``x.dtype`` (fused: added in fp32 to the fp32
    accumulator). Other activation dtypes fall back to the reference. ``path``: "fused" (the
    kernel), "dense" (dequantize, then cuBLAS) or "auto" (dense from ``dense_min_m()`` tokens).
    """
    _check("x", x, q, scale, zero, group_size, 1)
    if x.dtype not in _ACT_DTYPES:
        return w8a16_linear_ref(x, q, scale, zero, group_size, bias)
    n, k = q.shape
    if _dense(path, x.numel() // max(k, 1), group_size):
        w = _decode(q, scale, zero, group_size, x.dtype)
        return aligned.linear(x, w, None if bias is None else bias.to(x.dtype))
    x2 = x.reshape(-1, k)
    if x2.numel() and x2.stride(1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    y = _empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*x.shape[:-1], n)
    if k == 0:
        y.zero_()
        if bias is not None:
            y += bias.to(x.dtype)
        return y.view(*x.shape[:-1], n)
    b = None if bias is None else bias.to(x.dtype).contiguous()
    meta = dict(M_BUCKET=_m_bucket(m), GS=group_size, K_P2=_pow2_divisor(k), EVEN_K=k % _K_ALIGN == 0,
                SYMMETRIC=zero is None, HAS_BIAS=b is not None)  # fmt: skip
    qc = q.contiguous()
    ws = _workspace(m, n, x.device)
    zp, bp = scale if zero is None else zero, y if b is None else b  # placeholders never read
    args = (x2, qc, scale, zp, bp, y, ws, m, n, k, x2.stride(0))
    _reduce_splits(y, ws, _launch(_fwd_tuned, _w8a16_fwd_kernel, args, m, n, meta), b)
    return y.view(*x.shape[:-1], n)


def w8a16_grad_input_triton(
    dy: Tensor, q: Tensor, scale: Tensor, zero: Tensor | None, group_size: int, path: str = "auto"
) -> Tensor:
    """``dy @ dequant(W)``: ``dy [..., out]`` (fp32/bf16/fp16), ``q int8 [out, in]`` -> ``dx [..., in]``.

    Result in ``dy.dtype``, fp32 accumulation; ``path`` as in ``w8a16_linear_triton``.
    """
    _check("dy", dy, q, scale, zero, group_size, 0)
    if dy.dtype not in _ACT_DTYPES:
        return w8a16_grad_input_ref(dy, q, scale, zero, group_size)
    n, k = q.shape
    if _dense(path, dy.numel() // max(n, 1), group_size):
        return aligned.matmul(dy, _decode(q, scale, zero, group_size, dy.dtype))
    dy2 = dy.reshape(-1, n)
    if dy2.numel() and dy2.stride(1) != 1:
        dy2 = dy2.contiguous()
    m = dy2.shape[0]
    dx = _empty((m, k), dtype=dy.dtype, device=dy.device)
    if m == 0 or k == 0:
        return dx.view(*dy.shape[:-1], k)
    if n == 0:
        return dx.zero_().view(*dy.shape[:-1], k)
    meta = dict(M_BUCKET=_m_bucket(m), GS=group_size, K_P2=_pow2_divisor(k), EVEN_K=n % _K_ALIGN == 0,
                SYMMETRIC=zero is None)  # fmt: skip
    ws = _workspace(m, k, dy.device)
    args = (dy2, q.contiguous(), scale, scale if zero is None else zero, dx, ws, m, n, k, dy2.stride(0))
    _reduce_splits(dx, ws, _launch(_bwd_tuned, _w8a16_bwd_kernel, args, m, k, meta))
    return dx.view(*dy.shape[:-1], k)
