"""MemoryMonitor: peak memory per step and what it is made of."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import psutil
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn

from qgl.callbacks._lightning_private import should_accumulate
from qgl.callbacks.memory_snapshot import StepSnapshot
from qgl.nn import quantized_modules

PARTS = ("int8_weights", "params", "buffers", "optimizer_moments", "projections", "activations_other")
_MIB = 2**20


class MemoryMonitor(Callback):
    """Measure the peak memory of every optimizer step and split it into parts.

    On CUDA the peak is `torch.cuda.max_memory_allocated` over the step (reset at its start); on
    CPU it is the process's peak resident set size (`getrusage` on POSIX, psutil's `peak_wset` on
    Windows; the current RSS comes from psutil), which also counts the interpreter and libraries. The parts:
    `int8_weights` (the buffers of `qgl.nn.QLinear`s), `params` (other parameters, each storage
    once: a QLinear's gradient carrier costs one element), `buffers` (other buffers),
    `optimizer_moments` and `projections` (`optimizer.state_nbytes()`; other optimizers: the bytes
    of their state tensors, as moments) and `activations_other` = peak - the rest (activations,
    gradients, which layer-wise updates keep to a layer or two, and temporaries).

    Logs `memory/<part>_mib`, `memory/peak_mib` (and `memory/rss_mib` on CPU) every
    `log_every_n_steps` steps (default: the trainer's), prints a table at the end of fit, with
    `predicted` (bytes per part, e.g. from a memory planner) beside the measurement.

    `snapshot_step` (CUDA): record the caching allocator over that optimizer step (0 = the first) and
    write `memory-snapshot-step<N>.pickle` (for https://pytorch.org/memory_viz) and
    `memory-peak-step<N>.txt` (what was alive at the step's peak, by the code that allocated it) into
    `snapshot_dir`; also written if the step raises (an out-of-memory error, say).
    """

    def __init__(self, log_every_n_steps: int | None = None, predicted: dict[str, int] | None = None,
                 print_table: bool = True, snapshot_step: int | None = None,
                 snapshot_dir: str | Path = ".") -> None:
        self.snapshot = None if snapshot_step is None else StepSnapshot(snapshot_step, snapshot_dir)
        self.log_every_n_steps = log_every_n_steps
        self.predicted = dict(predicted or {})
        self.print_table = print_table
        self.peak: dict[str, int] = {}  # the parts at the step of the highest peak
        self.last: dict[str, int] = {}
        self.kind: str | None = None  # "cuda" (max_memory_allocated) or "rss", once measured
        self._window_peak = 0

    def _cuda(self, pl_module: pl.LightningModule) -> bool:
        return pl_module.device.type == "cuda"

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._cuda(pl_module):
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        snap = self.snapshot
        due = snap is not None and snap.written is None and trainer.global_step == snap.step
        if due and not snap.recording:
            if self._cuda(pl_module):
                snap.start(pl_module.device)
            else:
                rank_zero_warn("MemoryMonitor: memory snapshots record the CUDA allocator; on "
                               f"{pl_module.device.type} there is none, so step {snap.step} is not recorded")
                self.snapshot = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        cuda = self._cuda(pl_module)
        self.kind = "cuda" if cuda else "rss"
        peak = torch.cuda.max_memory_allocated(pl_module.device) if cuda else _peak_rss()
        self._window_peak = max(self._window_peak, peak)  # over the micro-batches of one step
        if pl_module.automatic_optimization and should_accumulate(trainer):
            return
        if self.snapshot is not None and self.snapshot.recording:
            self._write_snapshot(pl_module.device)
        rss = None if cuda else _current_rss()
        self.last = measure(pl_module, trainer.optimizers, max(self._window_peak, rss or 0))
        if rss is not None:
            self.last["rss"] = rss
        self._window_peak = 0
        if self.last["peak"] >= self.peak.get("peak", -1):
            self.peak = dict(self.last)
        n = self.log_every_n_steps or trainer.log_every_n_steps
        if n and trainer.global_step % n == 0 and trainer.loggers:
            metrics = {f"memory/{k}_mib": v / _MIB for k, v in self.last.items()}
            step = trainer.fit_loop.epoch_loop._batches_that_stepped
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.snapshot is not None and self.snapshot.recording:
            self._write_snapshot(pl_module.device, f"stopped by {type(exception).__name__}")

    def _write_snapshot(self, device: torch.device, why: str = "") -> None:
        pickle_path, text_path = self.snapshot.stop_and_write(device, why)
        rank_zero_info(f"MemoryMonitor: allocator snapshot of step {self.snapshot.step} in {pickle_path}, "
                       f"its peak in {text_path}")

    def summary(self) -> dict[str, Any]:
        """Bytes at the step of the highest peak: `peak` and each of `PARTS` (and `rss` on CPU)."""
        return dict(self.peak)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.snapshot is not None and self.snapshot.written is None:
            rank_zero_warn(f"MemoryMonitor: optimizer step {self.snapshot.step} was not run in this fit "
                           f"(it ran steps up to {trainer.global_step}), so it was not recorded")
        if self.print_table and self.peak:
            self._print()  # not pl_module.device: Lightning moved the module to the CPU at teardown

    @rank_zero_only
    def _print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        title = "Peak GPU memory (max_memory_allocated)" if self.kind == "cuda" else "Peak process RSS (CPU)"
        table = Table(title=title)
        table.add_column("part")
        table.add_column("measured", justify="right")
        if self.predicted:
            table.add_column("predicted", justify="right")
        for part in ("peak", *PARTS, *(("rss",) if "rss" in self.peak else ())):
            row = [part, _human(self.peak.get(part, 0))]
            if self.predicted:
                row.append(_human(self.predicted[part]) if part in self.predicted else "-")
            table.add_row(*row)
        Console().print(table)


def measure(model: nn.Module, optimizers: list[Any], peak: int) -> dict[str, int]:
    """The parts (bytes) of `peak`, see `MemoryMonitor`."""
    seen: set[int] = set()
    int8 = 0
    quantized_buffers: set[int] = set()
    for module in quantized_modules(model).values():
        for b in module.buffers(recurse=False):
            int8 += _storage_bytes(b, seen)
            quantized_buffers.add(id(b))
    params = sum(_storage_bytes(p, seen) for p in model.parameters())
    buffers = sum(_storage_bytes(b, seen) for b in model.buffers() if id(b) not in quantized_buffers)
    moments = projections = 0
    for optimizer in optimizers:
        if hasattr(optimizer, "state_nbytes"):
            nbytes = optimizer.state_nbytes()
            moments += nbytes["moments"]
            projections += nbytes["projections"]
        else:
            moments += sum(_storage_bytes(v, seen) for state in optimizer.state.values()
                           for v in state.values() if isinstance(v, Tensor))
    parts = dict(int8_weights=int8, params=params, buffers=buffers, optimizer_moments=moments,
                 projections=projections)
    parts["activations_other"] = max(0, peak - sum(parts.values()))
    return {"peak": int(peak), **parts}


def _storage_bytes(t: Tensor, seen: set[int]) -> int:
    # Count each storage once (tied weights, views); a stride-0 carrier has a one-element storage.
    storage = t.untyped_storage()
    key = storage.data_ptr()
    if key in seen or storage.nbytes() == 0:
        return 0
    seen.add(key)
    return int(storage.nbytes())


def _human(nbytes: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= size:
            return f"{nbytes / size:,.2f} {unit}"
    return f"{nbytes} B"


def _peak_rss() -> int:
    info = psutil.Process().memory_info()
    if hasattr(info, "peak_wset"):  # Windows
        return int(info.peak_wset)
    try:
        # psutil has no peak RSS on POSIX; `resource` exists there only (imported here, so that
        # Windows can import qgl.callbacks).
        import resource
    except ImportError:
        return int(info.rss)
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _current_rss() -> int:
    return int(psutil.Process().memory_info().rss)
