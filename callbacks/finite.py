"""`NonFiniteGuard`: stop training at the first non-finite loss or gradient, for every method, and
never let a checkpoint be written from a non-finite state.

Per step it costs one reduction per gradient (`qgl.optim.finite.NonFiniteFlags`: min and max into a
device buffer, no sync) and one device sync when the step ends, where the flags and the loss flag are
read together. `QGaLoreAdamW` (galore, qgalore) checks the gradients it steps itself, inside backward
when layer-wise, and raises `FloatingPointError`; the guard then checks only the loss.

Before any checkpoint is written it also checks every floating tensor of the model and the optimizer
state (one reduction each, one sync): a state that turned non-finite without a non-finite gradient
(e.g. a huge learning rate overflowing the weights) raises instead of replacing a good checkpoint, and
since the writer removes an older periodic checkpoint only after a new one is written, `last.ckpt`
and the newest periodic checkpoint stay the last finite ones whatever the rotation.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from torch import Tensor
from torch.optim import Optimizer

from qgl.optim.finite import NonFiniteFlags, all_finite


class NonFiniteError(FloatingPointError):
    """Training met a NaN or inf; `str(error)` is one line naming the step and the parameters."""


def _names(names: list[str], limit: int = 4) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _tensors(obj: Any, prefix: str) -> Iterator[tuple[str, Tensor]]:
    if isinstance(obj, Tensor):
        if obj.is_floating_point():
            yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}")


class NonFiniteGuard(Callback):
    """Raise `NonFiniteError` at the end of the first step whose loss or gradients hold a NaN/inf, and
    from `on_save_checkpoint` when the state to be written does (see the module docstring).

    Under fp16 mixed precision the gradient check is off (the GradScaler skips such steps by design);
    the loss is still checked."""

    def __init__(self) -> None:
        self._flags: NonFiniteFlags | None = None
        self._key: tuple[int, ...] = ()
        self._names: dict[int, str] = {}
        self._loss_ok: Tensor | None = None
        self._step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._step = trainer.global_step
        self._names = {id(p): n for n, p in pl_module.named_parameters()}

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: Optimizer) -> None:
        if str(trainer.precision) in ("16-mixed", "16"):
            return
        if getattr(optimizer, "check_finite", False):
            return  # QGaLoreAdamW checks the gradients it steps itself: no second reduction of each
        params = [p for g in optimizer.param_groups for p in g["params"]]
        key = tuple(id(p) for p in params)
        if self._flags is None or key != self._key:
            self._flags, self._key = NonFiniteFlags(params), key
        for p in params:
            if p.grad is not None:
                self._flags.check_(p, p.grad)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, Tensor):
            ok = all_finite(loss.detach())
            self._loss_ok = ok if self._loss_ok is None else self._loss_ok & ok
        if trainer.global_step == self._step:
            return  # mid-accumulation: read the flags once the optimizer step is done
        self._step = trainer.global_step
        flagged = self._flags.pop_flagged() if self._flags is not None else []  # the step's one sync
        loss_ok = self._loss_ok is None or bool(self._loss_ok)
        self._loss_ok = None
        if flagged or not loss_ok:
            what = [] if loss_ok else ["loss"]
            if flagged:
                what.append("gradient of " + _names([self._names.get(id(p), "<unnamed>") for p in flagged]))
            raise NonFiniteError(f"non-finite {' and '.join(what)} at step {trainer.global_step}; training "
                                 "stopped and this state was not saved")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        named = [*_tensors(checkpoint.get("state_dict", {}), ""),
                 *_tensors(checkpoint.get("optimizer_states", []), "optimizer")]
        if not named:
            return
        # One flag per tensor, stacked per device: one sync per device instead of one per tensor.
        by_device: dict[torch.device, list[tuple[str, Tensor]]] = {}
        for name, t in named:
            by_device.setdefault(t.device, []).append((name, all_finite(t)))
        bad = []
        for items in by_device.values():
            flags = torch.stack([f for _, f in items]).tolist()
            bad += [name for (name, _), ok in zip(items, flags, strict=True) if not ok]
        if bad:
            raise NonFiniteError(f"non-finite values in {_names(bad)} at step {trainer.global_step}; the "
                                 "checkpoint was not written (the previous ones are kept)")


__all__ = ["NonFiniteError", "NonFiniteGuard"]
