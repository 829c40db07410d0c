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

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from qgl.optim.finite import NonFiniteFlags


class LayerwiseDriver:
    """Owns the post-accumulate-grad hooks of a set of parameters. `defer=True` lets gradients
    accumulate instead.

    Args:
        params: the parameters; each that requires a gradient gets a hook.
        update: the per-parameter update, ``update(p)``: steps `p` from `p.grad` (the optimizer's
            `update_param`, which calls `qgl.optim.update.apply_update`); the driver frees the
            gradient after it. This module knows nothing else of the optimizer.
        name: the display name of a parameter (for errors).
        check_finite: flag non-finite gradients (zeroed before the update, raised by
            `raise_if_nonfinite`).
        clip_norm: clip each gradient to this norm before its update.

    `update_from_grad(p)` is the one place where a gradient meets its update: check and clip it,
    `self.update(p)`, free it. The driver's own hook calls it unless `defer`; under DDP,
    `qgl.optim.distributed.DistributedLayerwise` holds the hooks instead (`remove()` detaches
    these) and calls it on the owner once the gradient is reduced.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        update: Callable[[Tensor], None],
        name: Callable[[Tensor], str],
        *,
        check_finite: bool = True,
        clip_norm: float | None = None,
    ):
        if clip_norm is not None and clip_norm <= 0:
            raise ValueError(f"layerwise_clip_norm must be > 0, got {clip_norm}")
        params = list(params)
        self.update = update
        self.name = name
        self.check_finite = check_finite
        self.clip_norm = clip_norm
        self.defer = False
        # Its own record: step() checks the gradients the hooks deferred separately (not yet stepped).
        self._flags = NonFiniteFlags(params)
        self._handles = [
            p.register_post_accumulate_grad_hook(self._on_grad) for p in params if p.requires_grad
        ]

    def _on_grad(self, p: Tensor) -> None:
        if not self.defer:  # else: accumulating micro-batches, the gradient stays in `.grad`
            self.update_from_grad(p)

    def update_from_grad(self, p: Tensor) -> None:
        """Check `p.grad` (non-finite entries flagged and zeroed), clip it, `update(p)`, free it.

        Runs under `torch.no_grad()`, entered here only when grad mode is on (a direct call): in
        autograd's backward, where the hooks call it once per matrix, grad mode is already off, and
        a `@torch.no_grad()` decorator cost 15 Python calls per matrix there for nothing.
        """
        if torch.is_grad_enabled():
            with torch.no_grad():
                return self.update_from_grad(p)
        if self.check_finite:
            # The flag stays on the device (a sync here would stall backward once per parameter);
            # the update runs before it is read, so it takes the gradient with non-finite entries zeroed.
            self._flags.check_(p, p.grad, zero_nonfinite=True)
        if self.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_([p], self.clip_norm)
        self.update(p)
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
        """Raise FloatingPointError naming the parameters whose gradient the hooks found non-finite
        since the last call (one device sync)."""
        flagged = self._flags.pop_flagged()
        if flagged:
            bad = [self.name(p) for p in flagged]
            raise FloatingPointError(
                f"non-finite gradient in {bad}; layer-wise updates had already stepped these parameters "
                "with the non-finite entries zeroed"
            )

    def remove(self) -> None:
        """Detach the hooks (the optimizer then behaves as a plain, non-layer-wise one)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
