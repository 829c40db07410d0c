"""SubspaceMonitor: per-layer subspace refreshes of QGaLoreAdamW, logged and drawn as a heatmap."""

from __future__ import annotations

import math
import os
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch import Callback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn

from qgl.callbacks._lightning_private import should_accumulate

_MAX_COLUMNS = 400  # heatmap columns; longer runs are binned


class SubspaceMonitor(Callback):
    """Log what the layer-adaptive refresh does, from `optimizer.subspace_stats()`.

    Every `log_every_n_steps` optimizer steps (default: the trainer's) it logs, per projected
    layer, `subspace/<layer>/cos` (|cos| between the last two leading singular vectors), `/gap`,
    `/svd_count`, `/svd_seconds`, and `subspace/frozen_layers` (layers whose gap passed the
    refresh monitor's bound), `subspace/svd_total` and `subspace/svd_saved_frac`
    (1 - SVDs / the SVDs of plain GaLore's fixed schedule).

    Every refresh (its layer step, cosine and new gap) is kept in `history`, which the checkpoint
    saves. At the end of fit a heatmap (layers x steps, the cosine at each step, refreshes
    marked) is written to `trainer.log_dir` and logged to a `WandbLogger`; other loggers get the
    file's path printed.
    """

    def __init__(self, log_every_n_steps: int | None = None, heatmap: bool = True,
                 filename: str = "subspace_heatmap.png") -> None:
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps must be >= 1, got {log_every_n_steps}")
        self.log_every_n_steps = log_every_n_steps
        self.heatmap = heatmap
        self.filename = filename
        self.history: dict[str, dict[str, list]] = {}  # layer -> {"steps", "cos", "gap"}, one entry per SVD
        self.heatmap_path: str | None = None
        self._stats: dict[str, dict[str, Any]] = {}
        self._warned = False

    # ------------------------------------------------------------------ collecting

    @staticmethod
    def _optimizer(trainer: pl.Trainer) -> Any:
        return next((o for o in trainer.optimizers if hasattr(o, "subspace_stats")), None)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.automatic_optimization and should_accumulate(trainer):
            return  # no optimizer step on this micro-batch
        optimizer = self._optimizer(trainer)
        if optimizer is None:
            if not self._warned:
                rank_zero_warn("SubspaceMonitor: no optimizer with subspace_stats() (QGaLoreAdamW): "
                               "nothing to log")
                self._warned = True
            return
        self._stats = optimizer.subspace_stats()
        for name, s in self._stats.items():
            h = self.history.setdefault(name, {"steps": [], "cos": [], "gap": []})
            new = s["refresh_steps"][len(h["steps"]):]
            for i, step in enumerate(new):
                latest = i == len(new) - 1  # polled every step, so earlier ones exist only after a resume
                h["steps"].append(int(step))
                h["cos"].append(s["last_cos"] if latest else None)
                h["gap"].append(int(s["gap"]) if latest else None)
        n = self.log_every_n_steps or trainer.log_every_n_steps
        if n and trainer.global_step % n == 0 and trainer.loggers:
            metrics = self.metrics()
            step = trainer.fit_loop.epoch_loop._batches_that_stepped  # the step of this batch's other metrics
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def metrics(self) -> dict[str, float]:
        """The figures logged, from the last statistics read."""
        out: dict[str, float] = {}
        for name, s in self._stats.items():
            if s["last_cos"] is not None:
                out[f"subspace/{name}/cos"] = float(s["last_cos"])
            out[f"subspace/{name}/gap"] = float(s["gap"])
            out[f"subspace/{name}/svd_count"] = float(s["svd_count"])
            out[f"subspace/{name}/svd_seconds"] = float(s["svd_seconds"])
        summary = self.summary()
        out["subspace/frozen_layers"] = float(summary["frozen_layers"])
        out["subspace/svd_total"] = float(summary["svd_total"])
        out["subspace/svd_saved_frac"] = float(summary["svd_saved_frac"])
        return out

    def summary(self) -> dict[str, Any]:
        """SVDs run, their seconds, those plain GaLore would have run, the fraction saved, frozen layers,
        per-layer stats."""
        svd_total = sum(s["svd_count"] for s in self._stats.values())
        svd_seconds = sum(float(s["svd_seconds"]) for s in self._stats.values())
        galore = sum(s["galore_svds"] for s in self._stats.values())
        return dict(svd_total=svd_total, svd_seconds=svd_seconds, galore_svds=galore,
                    svd_saved_frac=1.0 - svd_total / galore if galore else 0.0,
                    frozen_layers=sum(bool(s["frozen"]) for s in self._stats.values()),
                    layers={name: {k: v for k, v in s.items() if k != "refresh_steps"}
                            for name, s in self._stats.items()},
                    heatmap=self.heatmap_path)

    # ------------------------------------------------------------------ the heatmap

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.heatmap or not self.history:
            return
        # trainer.log_dir is a collective under DDP: every rank asks, rank 0 alone draws.
        self._save_heatmap(trainer, trainer.log_dir or trainer.default_root_dir)

    @rank_zero_only
    def _save_heatmap(self, trainer: pl.Trainer, save_dir: str) -> None:
        os.makedirs(save_dir, exist_ok=True)
        self.heatmap_path = os.path.join(save_dir, self.filename)
        render_heatmap(self.history, max(trainer.global_step, 1), self.summary(), self.heatmap_path)
        wandb = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        for logger in wandb:
            logger.log_image(key="subspace/heatmap", images=[self.heatmap_path])
        if not wandb:
            rank_zero_info(f"SubspaceMonitor: heatmap saved to {self.heatmap_path}")

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"history": {k: {kk: list(vv) for kk, vv in v.items()} for k, v in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {k: {kk: list(vv) for kk, vv in v.items()} for k, v in state_dict["history"].items()}


def render_heatmap(history: dict[str, dict[str, list]], steps: int, summary: dict[str, Any],
                   path: str) -> None:
    """Layers x steps: the last measured cosine at each step (grey before the second SVD), SVDs as dots."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: Agg canvas, no global backend state

    names = list(history)
    width = math.ceil(steps / _MAX_COLUMNS)  # steps per column
    columns = math.ceil(steps / width)
    grid = np.full((len(names), columns), np.nan)
    for row, name in enumerate(names):
        h = history[name]
        for i, (step, cos) in enumerate(zip(h["steps"], h["cos"], strict=True)):
            if cos is None:
                continue
            end = h["steps"][i + 1] if i + 1 < len(h["steps"]) else steps
            grid[row, step // width:max(end // width, step // width + 1)] = cos
    fig = Figure(figsize=(10, 1.5 + 0.22 * len(names)), layout="constrained")
    ax = fig.subplots()
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0,
                      interpolation="nearest", extent=(0, columns * width, len(names) - 0.5, -0.5))
    for row, name in enumerate(names):
        ax.scatter(history[name]["steps"], [row] * len(history[name]["steps"]), s=9, c="white",
                   edgecolors="black", linewidths=0.4, zorder=3)
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names if len(names) <= 48 else [n if i % 4 == 0 else "" for i, n in enumerate(names)],
                       fontsize=6)
    ax.set_xlabel("layer step (dots: subspace refreshes)")
    fig.colorbar(image, ax=ax, label="|cos| of consecutive leading singular vectors")
    ax.set_title(f"{summary['svd_total']} SVDs vs {summary['galore_svds']} for fixed-gap GaLore "
                 f"({summary['svd_saved_frac']:.0%} saved), "
                 f"{summary['frozen_layers']}/{len(names)} layers frozen")
    fig.savefig(path, dpi=110)
