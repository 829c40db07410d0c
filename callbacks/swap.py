"""OptimizerSwap: the one optimizer swap of qgl's Lightning callbacks.

The module's `configure_optimizers` is built as written; its single optimizer is kept (never stepped)
and a replacement built from it takes its place. Its LR schedulers keep driving it, and its lr is
copied into the replacement before every batch. `QGaLoreCallback`, `AdamW8bitCallback` and the
benchmarks' public-package adapters are subclasses that say how to build the replacement.

Why a wrapper of `configure_optimizers` (and not a swap of `trainer.optimizers` in `on_fit_start`):
Lightning validates the user's optimizers (several under automatic optimization, schedulers bound to
them) before any callback hook runs; wrapping lets the swap refuse with its own message first and
hand Lightning the replacement to set up (device, precision plugin, checkpoint restore). The wrapper
is an instance attribute: it is removed when Lightning has called it, and at `teardown` and
`on_exception` otherwise, so a failed or finished run leaves the module's own method in place.

Lightning 2.6's fit order, which the swap relies on: callbacks' `setup` (wrap) -> `configure_model`
-> restore of module weights and callback states (`load_state_dict`) -> strategy setup, which calls
`configure_optimizers` (the swap) -> `on_fit_start` (the schedulers join) -> restore of optimizer
and scheduler states into the replacement -> training.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim import Optimizer

from qgl.callbacks._lightning_private import parse_optimizers

Build = Callable[[Optimizer, torch.device], Optimizer]

# Set on the wrappers this module installs: the module's own method, and what `unwrap` looks for.
_USER = "_qgl_user"


class OptimizerSwap(Callback):
    """Replace the optimizer of the module's `configure_optimizers` by `build(optimizer, device)`.

    The module's optimizer (exactly one) is built as written and never stepped: its LR schedulers
    keep driving its lr, which is copied into the new optimizer's groups before every batch (a new
    group takes the lr of the module's group `group["user_group"]`, default 0). That optimizer's
    state (its lr) is saved in this callback's state, so a resumed run continues the schedule.

    Subclasses override `check_user_optimizer` (refusals) and `build_optimizer` instead of passing
    `build`.
    """

    def __init__(self, build: Build | None = None) -> None:
        self.build = build
        self.optimizer: Optimizer | None = None
        self.user_optimizer: Optimizer | None = None
        self._scheduler_configs: list[LRSchedulerConfig] = []
        self._loaded_user_optimizer: dict[str, Any] | None = None

    # ------------------------------------------------------------------ what subclasses say

    def check_user_optimizer(self, pl_module: pl.LightningModule, user: Optimizer) -> None:
        """Raise a ValueError if `user` (the module's optimizer) cannot be swapped. Default: any is fine."""

    def build_optimizer(self, pl_module: pl.LightningModule, user: Optimizer,
                        device: torch.device) -> Optimizer:
        """The replacement of `user` (the module's optimizer, its resumed lr loaded) on `device`."""
        if self.build is None:
            raise NotImplementedError(f"{type(self).__name__}: pass build= or override build_optimizer")
        return self.build(user, device)

    # ------------------------------------------------------------------ the swap

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str = "fit") -> None:
        if stage == "fit":
            device = trainer.strategy.root_device
            wrap(pl_module, "configure_optimizers", lambda user: self._swap(pl_module, device, user()),
                 once=True)

    def _swap(self, pl_module: pl.LightningModule, device: torch.device, conf: Any) -> dict[str, Any]:
        optimizers, configs = parse_optimizers(pl_module, conf)
        if len(optimizers) != 1:
            raise ValueError(f"{type(self).__name__} replaces one optimizer; configure_optimizers returned "
                             f"{len(optimizers)}. Return a single optimizer")
        user = optimizers[0]
        self.check_user_optimizer(pl_module, user)
        if self._loaded_user_optimizer is not None:  # resuming: the lr its schedulers had set
            user.load_state_dict(self._loaded_user_optimizer)
            self._loaded_user_optimizer = None
        user._opt_called = True  # type: ignore[attr-defined]  # never stepped: no scheduler warning
        self.optimizer = self.build_optimizer(pl_module, user, device)
        self.user_optimizer, self._scheduler_configs = user, configs
        # Lightning refuses schedulers bound to an optimizer it was not given: they join in on_fit_start.
        return {"optimizer": self.optimizer}

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning set up the optimizers, before it restores their (and the schedulers') state.
        if not trainer.optimizers or trainer.optimizers[0] is not self.optimizer:
            raise RuntimeError(f"{type(self).__name__}: the trainer's optimizer is not the one it built; "
                               "was configure_optimizers replaced after setup?")
        trainer.strategy.lr_scheduler_configs.extend(self._scheduler_configs)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        user_groups = self.user_optimizer.param_groups
        for group in self.optimizer.param_groups:
            group["lr"] = float(user_groups[group.get("user_group", 0)]["lr"])

    # ------------------------------------------------------------------ every exit path

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.restore_module(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        # Lightning calls on_exception (not teardown) when fit fails, KeyboardInterrupt included.
        self.restore_module(pl_module)

    def restore_module(self, pl_module: pl.LightningModule) -> None:
        """Give the module its own methods back (idempotent). Subclasses undo their other changes too."""
        unwrap(pl_module, "configure_optimizers")

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"user_optimizer": None if self.user_optimizer is None else self.user_optimizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded_user_optimizer = state_dict.get("user_optimizer")


def wrap(pl_module: pl.LightningModule, name: str, body: Callable[[Callable[[], Any]], Any],
         once: bool = False) -> None:
    """Replace the instance's method `name` by `lambda: body(user_method)` (an instance attribute;
    wrapping twice wraps the user's method, not the wrapper). `once`: the wrapper removes itself when
    called, whether `body` returns or raises; otherwise `unwrap` removes it."""
    current = getattr(pl_module, name)
    user = getattr(current, _USER, current)

    def wrapper() -> Any:
        try:
            return body(user)
        finally:
            if once:
                unwrap(pl_module, name)

    setattr(wrapper, _USER, user)
    object.__setattr__(pl_module, name, wrapper)


def unwrap(pl_module: pl.LightningModule, name: str) -> None:
    """Remove the wrapper `wrap` installed as `name`, if any (the class's method shows again)."""
    if getattr(pl_module.__dict__.get(name), _USER, None) is not None:
        del pl_module.__dict__[name]
