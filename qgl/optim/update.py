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
from typing import Any

import torch
from torch import Tensor

from qgl.optim.adam import adam_direction, adam_step_
from qgl.optim.projector import GaLoreProjector
from qgl.quant import Int8Tensor

__all__ = ["apply_update", "sr_seed"]


def sr_seed(seed: int, index: int, step: int) -> int:
    """The stochastic-rounding seed of parameter `index` at `step` (from 1) under group seed `seed`."""
    # A cheap integer mix: distinct (seed, parameter, step) give unrelated Philox streams.
    return (((seed * 0x9E3779B1) ^ (index * 0x85EBCA77)) * 0xC2B2AE3D + step) % (2**62)


def apply_update(
    weight: Tensor | Int8Tensor, grad: Tensor, state: dict[str, Any], group: Mapping[str, Any], index: int
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
    if projector is not None:
        projector.maybe_refresh(grad, step - 1)
        with projector.decoded(grad):  # one decoding of an INT4 P for both products
            low = projector.project(grad)
            direction = adam_direction(low, state, beta1, beta2, group["eps"], step)
            if not int8:
                # A float weight: decay, then W += P-products of the direction, in place (one
                # addmm_, fp32 accumulation, one rounding): no (m, n) update is ever materialized.
                if decay != 1.0:
                    weight.mul_(decay)
                projector.add_back_(weight, direction, -lr)
                return
            # -lr rides on the low-rank tensor: no extra pass over the full-size update. An INT8
            # weight takes the update in bf16: its relative rounding (2**-9 of the update) is far
            # below the stochastic rounding onto the INT8 grid that follows, and the (m, n)
            # update is then written once and read once at half the bytes of fp32.
            delta = projector.project_back(direction, -lr, torch.bfloat16)
    elif not int8:  # plain: in place, in chunks (temporaries O(chunk))
        adam_step_(weight, grad, state, lr, decay, beta1, beta2, group["eps"], step)
        return
    else:
        delta = adam_direction(grad, state, beta1, beta2, group["eps"], step).mul_(-lr)
    seed = sr_seed(group["seed"], index, step) if group["stochastic_rounding"] else None
    weight.add_(delta, decay, seed)
