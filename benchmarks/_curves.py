"""Loss curves written while a run trains, so that a run killed half-way still leaves its curve.

`CurveWriter` (a Lightning callback) appends to one CSV file, flushed on every row:

* a training row every `every` optimizer steps (and at the last): the mean training loss of the
  steps since the previous row (each step's loss is the mean over its micro-batches, as
  `qgl.lightning.run.RunStats` counts it);
* a validation row after every validation (not the sanity check): `val/loss` and `val/ppl`.

Both carry the seconds since training started (validation included) and the tokens seen. With a
`deadline` (a `time.time()` value) it stops training at the first optimizer step past it, so that
the run still validates and reports the step it reached. `read_curve` reads a file back.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback

FIELDS = ("step", "train_loss", "val_loss", "val_ppl", "elapsed_s", "tokens")


class CurveWriter(Callback):
    """Append training/validation rows to `path` (CSV, `FIELDS`) as the run goes."""

    def __init__(self, path: Path, every: int = 10, deadline: float | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.path, self.every, self.deadline = Path(path), int(every), deadline
        self.stopped_at: int | None = None  # the step at which the deadline stopped training
        self._micro: list[float] = []  # losses of the micro-batches of the current step
        self._steps: list[float] = []  # losses of the steps since the last training row
        self._step = 0
        self._t0 = 0.0

    # -------------------------------------------------------------- file
    def _row(self, pl_module: LightningModule, step: int, **values: float | None) -> None:
        """Append one row (the file is opened per row: a few hundred rows a run, each on disk at once)."""
        row = {"step": step, "elapsed_s": f"{time.perf_counter() - self._t0:.2f}",
               "tokens": int(getattr(pl_module, "tokens_seen", 0))}
        row.update({k: "" if v is None else f"{v:.6g}" for k, v in values.items()})
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)

    def _flush_train(self, pl_module: LightningModule) -> None:
        if self._steps:
            self._row(pl_module, self._step, train_loss=sum(self._steps) / len(self._steps))
            self._steps = []

    # -------------------------------------------------------------- hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._t0, self._step = time.perf_counter(), trainer.global_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w", newline="") as f:
            csv.DictWriter(f, FIELDS).writeheader()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is not None:  # Lightning hands callbacks the loss divided by the accumulation factor
            self._micro.append(float(loss) * trainer.accumulate_grad_batches)
        if trainer.global_step == self._step:
            return  # inside an accumulation window
        self._step = trainer.global_step
        if self._micro:
            self._steps.append(sum(self._micro) / len(self._micro))
            self._micro = []
        if self._step % self.every == 0:
            self._flush_train(pl_module)
        late = self.deadline is not None and time.time() >= self.deadline
        if late and trainer.global_step < trainer.max_steps:
            trainer.should_stop = True
            self.stopped_at = trainer.global_step

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush_train(pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        loss = float(metrics["val/loss"]) if "val/loss" in metrics else None
        ppl = float(metrics["val/ppl"]) if "val/ppl" in metrics else None
        if loss is not None or ppl is not None:
            self._row(pl_module, trainer.global_step, val_loss=loss, val_ppl=ppl)


def _number(text: str) -> float | None:
    """The value of a field, None when empty or unreadable (nan/inf are kept: a diverged run shows)."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def read_curve(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{"train": [(step, loss)], "val": [(step, loss)], "val_ppl": [(step, ppl)], "elapsed": [(step, s)],
    "tokens": [(step, n)]} from a `CurveWriter` file; a truncated last line is ignored."""
    curve: dict[str, list[tuple[int, float]]] = {"train": [], "val": [], "val_ppl": [], "elapsed": [],
                                                  "tokens": []}
    if not Path(path).is_file():
        return curve
    lines = Path(path).read_text().splitlines(keepends=True)
    if lines and not lines[-1].endswith("\n"):
        lines.pop()  # cut short by a kill while it was being written
    for row in csv.DictReader(lines):
        try:
            step = int(row["step"])
        except (TypeError, ValueError, KeyError):
            continue
        for key, field in (("train", "train_loss"), ("val", "val_loss"), ("val_ppl", "val_ppl"),
                           ("elapsed", "elapsed_s"), ("tokens", "tokens")):
            value = _number(row.get(field) or "")
            if value is not None:
                curve[key].append((step, value))
    return curve
