"""Driving `apply_update` by hand, as `QGaLoreAdamW` does, for tests that compare the two (imported by
name: pytest puts tests/ on sys.path)."""

from collections.abc import Callable

import torch

from qgl.optim import QGaLoreAdamW
from qgl.optim.update import DeviceScalars, apply_update
from qgl.quant import storage_of

Scalars = Callable[[dict, dict], DeviceScalars | None]


def step_by_hand(opt: QGaLoreAdamW, scalars: Scalars | None = None) -> None:
    """One step of every parameter of `opt` (each holds a gradient), through `apply_update` (state made
    on first use, the parameter's index keying the stochastic rounding); `scalars(state, group)` gives
    each update's device scalars (None: host numbers)."""
    for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
        state, group = opt.state[p], opt._group_of[p]
        if not state:
            opt._init_state(p, group, state)
        with torch.no_grad():
            apply_update(storage_of(p) or p, p.grad, state, group, i, scalars and scalars(state, group))
