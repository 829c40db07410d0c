"""Layer-wise updates: step each parameter from its post-accumulate-grad hook, free its grad.

No full-model gradient then exists: at any moment at most the gradients of the layers whose
backward is running are alive. Rules, each a consequence of the gradient being gone:

- Gradient accumulation: wrap the backward of every micro-batch but the last in
  `optimizer.layerwise.accumulating()`. Gradients then sum in `.grad` as usual (so those
  micro-batches hold full gradients) and the last backward's hooks step with the sum.
- Clipping: a global norm needs every gradient at once, so it cannot be applied; the
  optimizer's `layerwise_clip_norm` clips each parameter's gradient on its own instead.
- Call `optimizer.step()` once per step anyway: it steps anything left with a gradient and
  raises on the non-finite gradients the hooks met (checked there, once, not per parameter).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from qgl.optim.qgalore_adamw import QGaLoreAdamW


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


class LayerwiseDriver:
    """Owns the hooks of one optimizer. `defer=True` lets gradients accumulate instead."""

    def __init__(self, optimizer: QGaLoreAdamW, clip_norm: float | None = None):
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"layerwise_clip_norm must be > 0, got {clip_norm}")
        self.optimizer = optimizer
        self.clip_norm = clip_norm
        self.defer = False
        self._finite_flags: list[tuple[Tensor, Tensor]] = []
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_grad)
            for group in optimizer.param_groups
            for p in group["params"]
            if p.requires_grad
        ]

    @torch.no_grad()
    def _on_grad(self, p: Tensor) -> None:
        if self.defer:
            return
        if self.optimizer.check_finite:
            # Keep the flag on the device; a sync here would stall backward once per parameter.
            self._finite_flags.append((p, all_finite(p.grad)))
            p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.clip_norm)
        self.optimizer.update_param(p)
        p.grad = None

    @contextmanager
    def accumulating(self) -> Iterator[None]:
        """Backward passes inside accumulate into `.grad`; the next one outside steps."""
        previous, self.defer = self.defer, True
        try:
            yield
        finally:
            self.defer = previous

    def raise_if_nonfinite(self) -> None:
        if not self._finite_flags:
            return
        params, flags = zip(*self._finite_flags, strict=True)
        self._finite_flags = []
        finite = torch.stack(flags)
        if not bool(finite.all()):
            bad = [
                self.optimizer.param_name(p) for p, ok in zip(params, finite.tolist(), strict=True) if not ok
            ]
            raise FloatingPointError(
                f"non-finite gradient in {bad}; layer-wise updates had already stepped these parameters "
                "with the non-finite entries zeroed"
            )

    def remove(self) -> None:
        """Detach the hooks (the optimizer then behaves as a plain, non-layer-wise one)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
