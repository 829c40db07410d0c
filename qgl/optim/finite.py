"""The non-finite gradient check: one reduction a gradient, one device sync a step.

A layer-wise optimizer checks every gradient inside backward, where a sync would stall the
queue once per parameter, so each check only writes the gradient's min and max into a slot of a
device buffer and the buffer is read once when the step ends. One `aminmax` launch: host time
matters as much as device time here, since it is paid for every matrix of the model in every step
(`benchmarks/overhead.py`: the former per-gradient `isfinite` flags cost ~90 us of host time each).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def all_finite(t: Tensor) -> Tensor:
    """0-dim bool on t's device: t (floating, any shape) holds no NaN and no +-inf.

    One reduction (`aminmax` propagates NaN; an inf is the min or the max) and no sync.
    `torch.isfinite(t).all()` materializes |t| and three bool masks, about 5 bytes an element (0.6
    GiB for LLaMA-7B's head gradient), a transient the memory plan does not count.
    """
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


class NonFiniteFlags:
    """The min and max of each checked gradient, kept on its device until `pop_flagged` reads them.

    Args:
        params: every parameter that may be checked, in a fixed order (the slots' index).
    """

    def __init__(self, params: Sequence[Tensor]):
        self._params = list(params)
        self._index = {p: i for i, p in enumerate(self._params)}
        # [len(params), 2] (min, max) per (device, gradient dtype): aminmax writes its own dtype.
        self._extrema: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def check_(self, p: Tensor, grad: Tensor, zero_nonfinite: bool = False) -> None:
        """Record whether `grad` (p's gradient) holds a NaN or an inf, without a sync; with
        `zero_nonfinite`, also set those entries to 0 in place (for an update that runs before the
        record is read). One reduction (`aminmax` propagates NaN; an inf is the min or the max), no
        temporaries."""
        if grad.numel() == 0:
            return
        key = (grad.device, grad.dtype)
        if key not in self._extrema:
            self._extrema[key] = torch.zeros(len(self._params), 2, dtype=grad.dtype, device=grad.device)
        slot = self._extrema[key][self._index[p]]
        torch.aminmax(grad, out=(slot[0], slot[1]))
        if zero_nonfinite:
            grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)

    def pop_flagged(self) -> list[Tensor]:
        """The parameters whose checked gradient was not finite (in order); the record is cleared.
        One sync per (device, dtype) used."""
        flagged: list[int] = []
        for extrema in self._extrema.values():
            bad = ~torch.isfinite(extrema).all(dim=1)
            if bool(bad.any()):
                flagged += bad.nonzero().flatten().tolist()
            extrema.zero_()
        return [self._params[i] for i in sorted(set(flagged))]
