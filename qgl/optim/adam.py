"""Adam moments in 32 or 8 bits, and the Adam step direction they give.

The direction is what AdamW subtracts (times lr) from the weight:

    m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
    direction = (m / (1 - b1^t)) / (sqrt(v) / sqrt(1 - b2^t) + eps)

computed in fp32 whatever the gradient's dtype. GaLore projects it back to the weight's
shape before applying it, which is why this module returns the direction instead of
updating a parameter.

8-bit moments use bitsandbytes' blockwise dynamic format (`qgl.quant.blockwise8`, block 256).
On CUDA the update runs in bitsandbytes' fused kernel; elsewhere in `_direction_8bit_ref`,
the same math in plain torch. As bitsandbytes does, tensors of fewer than `MIN_8BIT_SIZE`
elements keep fp32 moments: quantizing them saves nothing and costs accuracy.

`adam_step_` is the whole AdamW step of a plain (full-gradient) parameter, in place and over
chunks of `PLAIN_CHUNK` elements, so that its fp32 temporaries (the gradient's fp32 copy, the
direction, the fp32 moments of the reference, its cast to the parameter's dtype) are O(chunk)
instead of O(numel): an embedding of 131M elements would otherwise need about 1.3 GB of them.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
from torch import Tensor

from qgl.optim.settings import OPTIM_BITS, QGALORE
from qgl.quant.blockwise8 import dequantize_blockwise, dynamic_map, quantize_blockwise

MIN_8BIT_SIZE: int = QGALORE["min_8bit_size"]
"""Default size under which tensors keep fp32 moments (bitsandbytes' `min_8bit_size`)."""

BLOCK_8BIT = 256
"""Elements per absmax entry of the 8-bit moments (bitsandbytes' blockwise Adam kernels)."""
PLAIN_CHUNK = 1 << 22
"""Elements per chunk of `adam_step_` (16 MiB in fp32), a multiple of `BLOCK_8BIT`: a chunk's 8-bit
moments are whole blocks, so the chunked step is bit-identical to one pass over the tensor."""

_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes",
                "exp_avg_sq_absmax")
_QMAPS: dict[tuple[bool, torch.device], Tensor] = {}


def _qmap(signed: bool, device: torch.device) -> Tensor:
    key = (signed, device)
    if key not in _QMAPS:
        _QMAPS[key] = dynamic_map(signed).to(device)
    return _QMAPS[key]


def init_moments(
    shape: tuple[int, ...], device: torch.device, bits: int, min_8bit_size: int = MIN_8BIT_SIZE
) -> dict[str, Tensor]:
    """Zero moments for a gradient of `shape`: fp32 tensors, or uint8 codes + fp32 block absmax."""
    if bits not in OPTIM_BITS:
        raise ValueError(f"optim_bits must be one of {OPTIM_BITS}, got {bits}")
    numel = math.prod(shape)
    if bits == 32 or numel < min_8bit_size:
        zeros = lambda: torch.zeros(shape, dtype=torch.float32, device=device)
        return {"exp_avg": zeros(), "exp_avg_sq": zeros()}
    n_blocks = math.ceil(numel / BLOCK_8BIT)
    codes = lambda: torch.zeros(shape, dtype=torch.uint8, device=device)
    absmax = lambda: torch.zeros(n_blocks, dtype=torch.float32, device=device)
    # Code 0 is not the value 0 in the dynamic map, but absmax 0 makes every value 0.
    return {
        "exp_avg_codes": codes(),
        "exp_avg_absmax": absmax(),
        "exp_avg_sq_codes": codes(),
        "exp_avg_sq_absmax": absmax(),
    }


def moments_nbytes(state: dict[str, Tensor]) -> int:
    return sum(state[k].numel() * state[k].element_size() for k in _MOMENT_KEYS if k in state)


def adam_direction(
    grad: Tensor, state: dict[str, Tensor], beta1: float, beta2: float, eps: float, step: int | Tensor
) -> Tensor:
    """Advance the moments in `state` by `grad` (any float dtype) and return the fp32 direction.

    `step` counts from 1: an int, or (8-bit moments only) a one-element int tensor on grad's device
    that the kernel reads when it runs, so that a CUDA graph can replay the call as the step advances
    (`qgl.kernels.adam8_triton`, which then runs wherever Triton does: CUDA, or the interpreter). The
    moments in `state` are updated in place.
    """
    if isinstance(step, Tensor):
        if "exp_avg" in state:
            raise ValueError("a device step needs 8-bit moments (optim_bits=8); 32-bit moments take "
                             "an int step")
        from qgl.kernels.adam8_triton import adam8_direction_triton

        device = grad.device
        return adam8_direction_triton(
            grad, state["exp_avg_codes"], state["exp_avg_absmax"], state["exp_avg_sq_codes"],
            state["exp_avg_sq_absmax"], _qmap(True, device), _qmap(False, device), beta1, beta2, eps, step,
        )  # fmt: skip
    if "exp_avg" in state:
        return _direction_32bit(grad.float(), state["exp_avg"], state["exp_avg_sq"], beta1, beta2, eps, step)
    if grad.is_cuda and _bitsandbytes() is not None:
        return _direction_8bit_bnb(grad, state, beta1, beta2, eps, step)
    return _direction_8bit_ref(grad, state, beta1, beta2, eps, step)


def adam_step_(
    p: Tensor,
    grad: Tensor,
    state: dict[str, Tensor],
    lr: float,
    decay: float,
    beta1: float,
    beta2: float,
    eps: float,
    step: int,
) -> None:
    """One AdamW step of `p` in place: ``p <- p * decay - lr * direction`` (`decay` = 1 - lr * wd).

    `p`: floating, any shape; `grad`: `p`'s shape, any float dtype; `state`: `init_moments(p.shape)`
    (updated in place); `step` counts from 1. The direction is fp32 and is cast to `p.dtype` before
    it is subtracted, as two rounded in-place operations (decay, then the update). The work runs over
    consecutive chunks of the flattened tensors, `PLAIN_CHUNK` elements each; every operation is
    per element (per 256-element block for 8-bit moments), so the result is bit-identical to one
    pass, with temporaries of O(`PLAIN_CHUNK`) elements. Non-contiguous `p` or `grad`: one pass.
    """
    if not (p.is_contiguous() and grad.is_contiguous()):
        _apply(p, adam_direction(grad, state, beta1, beta2, eps, step), lr, decay)
        return
    flat_p, flat_g = p.view(-1), grad.view(-1)
    numel, size = flat_p.numel(), plain_chunk()
    for start in range(0, numel, size):
        stop = min(start + size, numel)
        part, g = _state_slice(state, start, stop), flat_g[start:stop]
        # No name holds the direction: it is freed before the next chunk's is made.
        _apply(flat_p[start:stop], adam_direction(g, part, beta1, beta2, eps, step), lr, decay)


def plain_chunk() -> int:
    """Elements per chunk of `adam_step_`: `PLAIN_CHUNK` rounded down to whole 8-bit blocks (at least
    one; read at call time, so a test may shrink it)."""
    return BLOCK_8BIT * max(1, PLAIN_CHUNK // BLOCK_8BIT)


def _apply(p: Tensor, direction: Tensor, lr: float, decay: float) -> None:
    if decay != 1.0:
        p.mul_(decay)
    p.add_(direction.to(p.dtype), alpha=-lr)


def _state_slice(state: dict[str, Tensor], start: int, stop: int) -> dict[str, Tensor]:
    """Views of the moments of flat elements [start, stop) (`start` a multiple of `BLOCK_8BIT`):
    fp32 moments or 8-bit codes sliced alike, absmax by block. A slice of a bitsandbytes paged
    tensor is marked paged too (bitsandbytes' device check skips paged tensors)."""
    blocks = slice(start // BLOCK_8BIT, math.ceil(stop / BLOCK_8BIT))
    out = {}
    for key in (k for k in _MOMENT_KEYS if k in state):
        t = state[key]
        out[key] = t[blocks] if key.endswith("_absmax") else t.view(-1)[start:stop]
        if getattr(t, "is_paged", False):
            out[key].is_paged = True
            out[key].page_deviceid = t.page_deviceid
    return out


@functools.cache
def _bitsandbytes():
    """bitsandbytes.functional, or None (with one warning) where it is not installed."""
    try:
        import bitsandbytes.functional as bnbf  # imported late: its import logs warnings on CPU-only hosts
    except ImportError:
        warnings.warn(
            "bitsandbytes is not installed: 8-bit Adam runs the plain-torch reference on CUDA "
            "(same math, slower); `pip install bitsandbytes` for the fused kernel",
            stacklevel=3,
        )
        return None
    return bnbf


def _direction_32bit(
    g: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, eps: float, step: int
) -> Tensor:
    # Same operations, in the same order, as torch.optim.AdamW's single-tensor path.
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    denom = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    return (exp_avg / bias_correction1).div_(denom)


def _direction_8bit_ref(
    grad: Tensor, state: dict[str, Tensor], beta1: float, beta2: float, eps: float, step: int
) -> Tensor:
    g = grad.float()
    device = g.device
    m = dequantize_blockwise(
        state["exp_avg_codes"].view(-1), state["exp_avg_absmax"], _qmap(True, device), g.shape
    )
    v = dequantize_blockwise(
        state["exp_avg_sq_codes"].view(-1), state["exp_avg_sq_absmax"], _qmap(False, device), g.shape
    )
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    # As in bitsandbytes' kernel: the direction uses the fp32 moments, then they are requantized.
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    direction = (m / (1 - beta1**step)).div_(denom)
    for name, value, signed in (("exp_avg", m, True), ("exp_avg_sq", v, False)):
        codes, absmax = quantize_blockwise(value, _qmap(signed, device))
        if not signed:
            # Nearest rounding would flush a tiny second moment to exactly 0, and a later step
            # with a zero gradient (an unused embedding row, say) would divide m by eps alone.
            # The smallest positive entry (code 1 of the sorted unsigned map) keeps v > 0.
            codes.masked_fill_((codes == 0) & (value.view(-1) > 0), 1)
        state[f"{name}_codes"].view(-1).copy_(codes)
        state[f"{name}_absmax"].copy_(absmax)
    return direction


def _direction_8bit_bnb(
    grad: Tensor, state: dict[str, Tensor], beta1: float, beta2: float, eps: float, step: int
) -> Tensor:
    bnbf = _bitsandbytes()
    # bitsandbytes updates a parameter in place, p -= lr * direction: from p = 0 with lr = -1 and
    # no weight decay, p ends as the direction (lr only scales the step: the sign flip is exact).
    g = grad.float().contiguous()
    p = torch.zeros_like(g)
    bnbf.optimizer_update_8bit_blockwise(
        "adam",
        g,
        p,
        state["exp_avg_codes"],
        state["exp_avg_sq_codes"],
        beta1,
        beta2,
        0.0,
        0.0,
        eps,
        step,
        -1.0,
        _qmap(True, g.device),
        _qmap(False, g.device),
        state["exp_avg_absmax"],
        state["exp_avg_sq_absmax"],
        0.0,
        1.0,
        False,
    )
    return p
