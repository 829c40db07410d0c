"""Every private Lightning API that qgl uses, in one place, each with why.

Lightning makes no promise about names starting with `_`: pyproject.toml bounds `lightning`
(`>=2.4,<2.7`, tested on 2.6.6) and `tests/test_packaging.py` checks that the installed version is
inside that bound and that every symbol in `PRIVATE_SYMBOLS` still exists. Raising the upper bound
means re-reading each use below against the new release.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.core.optimizer import (
    # Parses a `configure_optimizers` return value (optimizer, list, dict, tuple of lists...) into
    # optimizers, schedulers and a monitor key the way Lightning does, so the swap accepts every form
    # Lightning accepts; there is no public parser.
    _configure_optimizers,
    # Turn the user's schedulers into `LRSchedulerConfig`s (interval, frequency, monitor) exactly as
    # Lightning would, for automatic and manual optimization: the swap adds those configs to the
    # trainer itself in on_fit_start, since Lightning refuses schedulers bound to an optimizer it was
    # not given (the user's, which the swap keeps but does not hand over).
    _configure_schedulers_automatic_opt,
    _configure_schedulers_manual_opt,
    # Lightning's own check that every scheduler steps one of the given optimizers: it never sees the
    # user's schedulers with the user's optimizer, so the swap runs the check in its place.
    _validate_optimizers_attached,
    # Lightning's own check that a scheduler has the API Lightning steps (or `lr_scheduler_step` is
    # overridden), for the same reason.
    _validate_scheduler_api,
)
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim import Optimizer

# (module, attribute) of every private symbol used here; tests/test_packaging.py imports each.
PRIVATE_SYMBOLS: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.core.optimizer", "_configure_optimizers"),
    ("lightning.pytorch.core.optimizer", "_configure_schedulers_automatic_opt"),
    ("lightning.pytorch.core.optimizer", "_configure_schedulers_manual_opt"),
    ("lightning.pytorch.core.optimizer", "_validate_optimizers_attached"),
    ("lightning.pytorch.core.optimizer", "_validate_scheduler_api"),
    ("lightning.pytorch.loops.fit_loop", "_FitLoop._should_accumulate"),
)


def parse_optimizers(pl_module: pl.LightningModule, conf: Any
                     ) -> tuple[list[Optimizer], list[LRSchedulerConfig]]:
    """The optimizers and the validated scheduler configs of `configure_optimizers`' return value `conf`."""
    optimizers, schedulers, monitor = _configure_optimizers(conf)
    if pl_module.automatic_optimization:
        configs = _configure_schedulers_automatic_opt(schedulers, monitor)
    else:
        configs = _configure_schedulers_manual_opt(schedulers)
    _validate_optimizers_attached(optimizers, configs)
    _validate_scheduler_api(configs, pl_module)
    return optimizers, configs


def should_accumulate(trainer: pl.Trainer) -> bool:
    """Whether the current micro-batch only accumulates gradients (no optimizer step after it).

    `fit_loop._should_accumulate()` is Lightning's own decision (accumulate_grad_batches, the last
    batch of an epoch, strategies that accumulate themselves); layer-wise updates and the monitors
    must step and measure exactly where Lightning steps, so they ask the loop rather than recompute it.
    """
    return trainer.fit_loop._should_accumulate()
