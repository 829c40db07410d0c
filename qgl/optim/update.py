"""The update of one parameter: a pure function of (gradient, state, settings, weight storage).

`apply_update` is the optimizer core. It reads the hyper-parameters from `group` (a param group of
`QGaLoreAdamW`: lr, betas, eps, weight_decay, seed, stochastic_rounding; a GaLore group's projector
sits in `state`), advances the per-parameter `state` (step, Adam moments, projector) and applies
the update to `weight`, which is the storage of the parameter:

- a float `Tensor` (the Parameter itself): updated in place;
- a `qgl.quant.Int8Tensor` (the INT8 weight of a `qgl.nn.QLinear`, found by `qgl.quant.storage_of`):
  W_int8 <- SR(decay * dequant(W) + delta), stochastic rounding in fp32 with a seed derived from
  (group seed, parameter index, step), so runs are reproducible and nothing but the seed is needed
  to resume them.

It calls nothing of the optimizer, the layer-wise driver or the offloader; they call it:
`QGaLoreAdamW.update_param` (from `step` and from the layer-wise hooks, inside
`offloader.resident(...)` when states are offloaded) looks up the state and settings of a parameter
and calls it once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qgl.optim.adam import adam_direction, adam_step_
from qgl.optim.projector import GaLoreProjector
from qgl.quant import Int8Tensor

__all__ = ["DeviceScalars", "apply_update", "sr_key", "sr_seed"]


def sr_key(seed: int, index: int) -> int:
    """The stochastic-rounding key of parameter `index` under group seed `seed`, in [0, 2**62)."""
    # A cheap integer mix: distinct (seed, parameter, step) give unrelated Philox streams.
    return (((seed * 0x9E3779B1) ^ (index * 0x85EBCA77)) * 0xC2B2AE3D) % (2**62)


def sr_seed(seed: int, index: int, step: int) -> int:
    """The stochastic-rounding seed of parameter `index` at `step` (from 1): ``(key + step) mod 2**62``."""
    return (sr_key(seed, index) + step) % (2**62)


@dataclass
class DeviceScalars:
    """The numbers of one update that change from step to step, as tensors on the weight's device.

    The kernels read them when they run, so a CUDA graph captured once replays the update of every
    later step (`qgl.optim.graphed`); each equals, in fp32 or int64, the number `apply_update`
    computes on the host, and gives the same bits.

    Attributes:
        step: int64 ``[1]``, the step this update makes (from 1): Adam's bias corrections and the
            stochastic-rounding key ``(sr_key + step) mod 2**62``.
        back: fp32 0-dim, the back-projection's multiplier ``scale * -lr``.
        decay: fp32 0-dim, ``1 - lr * weight_decay``.
    """

    step: Tensor
    back: Tensor
    decay: Tensor


def apply_update(
    weight: Tensor | Int8Tensor,
    grad: Tensor,
    state: dict[str, Any],
    group: Mapping[str, Any],
    index: int,
    scalars: DeviceScalars | None = None,
) -> None:
    """One AdamW step (GaLore-projected if `state` holds a projector) of `weight` from `grad`.

    Args:
        weight: the float Parameter (updated in place) or its `Int8Tensor` storage, shape ``(m, n)``
            (any shape for plain parameters).
        grad: the gradient, the weight's shape, any float dtype (not modified, not freed).
        state: the parameter's initialized state (`step`, Adam moments: fp32 or 8-bit blocks of the
            gradient's or the low-rank gradient's shape, and `projector` for GaLore parameters);
            updated in place: `step` += 1, moments advanced, projector refreshed when due.
        group: hyper-parameters (lr, betas, eps, weight_decay, seed, stochastic_rounding).
        index: the parameter's index in the optimizer (keys the stochastic rounding).
        scalars: the step, the back-projection's multiplier and the decay as device tensors (a GaLore
            parameter with 8-bit moments and stochastic rounding only): the path a CUDA graph
            captures. The caller has written them for this step; `state["step"]` still advances here.

    Run it with grad mode off (`QGaLoreAdamW.update_param` enters ``torch.no_grad()`` when it is on:
    one context for the call chain, none inside the backward hooks, where it is already off).
    """
    state["step"] += 1
    step = state["step"]
    beta1, beta2 = group["betas"]
    projector: GaLoreProjector | None = state.get("projector")
    lr = group["lr"]
    decay = 1.0 - lr * group["weight_decay"]
    int8 = isinstance(weight, Int8Tensor)
    if scalars is not None and (projector is None or (int8 and not group["stochastic_rounding"])):
        raise ValueError("device scalars serve a GaLore parameter with stochastic rounding")
    if projector is not None:
        # Device scalars (a CUDA graph's): the same operations, with the step, -lr (times scale)
        # and the decay read from tensors.
        adam_step, back = (step, -lr) if scalars is None else (scalars.step, scalars.back)
        projector.maybe_refresh(grad, step - 1)
        with projector.decoded(grad):  # one decoding of an INT4 P for both products
            low = projector.project(grad)
            direction = adam_direction(low, state, beta1, beta2, group["eps"], adam_step)
            if not int8:
                # A float weight: decay, then W += P-products of the direction, in place (one
                # addmm_, fp32 accumulation, one rounding): no (m, n) update is ever materialized.
                if scalars is not None:
                    weight.mul_(scalars.decay)  # a decay of 1 is exact: skipped below, not here
                elif decay != 1.0:
                    weight.mul_(decay)
                projector.add_back_(weight, direction, back)
                return
            # -lr rides on the low-rank tensor: no extra pass over the full-size update. An INT8
            # weight takes the update in bf16: its relative rounding (2**-9 of the update) is far
            # below the stochastic rounding onto the INT8 grid that follows, and the (m, n)
            # update is then written once and read once at half the bytes of fp32.
            delta = projector.project_back(direction, back, torch.bfloat16)
        if scalars is not None:
            weight.add_(delta, scalars.decay, sr_key(group["seed"], index), step=scalars.step)
            return
    elif not int8:  # plain: in place, in chunks (temporaries O(chunk))
        adam_step_(weight, grad, state, lr, decay, beta1, beta2, group["eps"], step)
        return
    else:
        delta = adam_direction(grad, state, beta1, beta2, group["eps"], step).mul_(-lr)
    seed = sr_seed(group["seed"], index, step) if group["stochastic_rounding"] else None
    weight.add_(delta, decay, seed)
