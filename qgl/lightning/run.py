"""`run(cfg)`: one training run from a resolved recipe (what `qgl train` calls).

It wires the parts together and holds no training logic: `TextDataModule`, `CausalLMModule`,
the callbacks of `cfg.method` (`qgl.callbacks.method_callbacks`: none for "full", `QGaLoreCallback`
with its `SubspaceMonitor` for "qgalore" and "galore", LoRA, 8-bit AdamW), `MemoryMonitor`, a rich
progress bar, `NonFiniteGuard`, `AtomicModelCheckpoint`, the W&B (offline unless a key is configured)
or CSV logger, and a `Trainer` from `cfg.trainer`; then it fits and prints a summary, which it also
returns. Before anything is built it resolves the run directory (`qgl.lightning.resume`), creates and
write-tests it, and checks a resumed checkpoint against the recipe.
"""

from __future__ import annotations

import itertools
import math
import netrc
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.profilers import AdvancedProfiler, Profiler, PyTorchProfiler, SimpleProfiler
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from qgl.callbacks.finite import NonFiniteError, NonFiniteGuard
from qgl.config import RecipeConfig
from qgl.lightning.checkpoint import AtomicModelCheckpoint
from qgl.lightning.resume import (
    RecipeRecord,
    check_resume,
    prepare_dirs,
    resolve_run,
    share_with_launched_ranks,
)

_MIB = 2**20


class RunStats(Callback):
    """Training loss of each optimizer step (mean over its micro-batches), training time without
    validation (for tokens/s, also from the end of the first optimizer step on: that step runs every
    layer's first SVD) and the last validated step."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self._window: list[float] = []
        self._step = -1
        self.train_seconds = 0.0
        self.tokens = 0
        self.last_val_step: int | None = None
        self._t0 = self._val_t0 = 0.0
        self._tokens0 = 0
        self._t1: float | None = None  # end of the first optimizer step
        self.first_step_seconds: float | None = None  # train start to _t1: the step with every first SVD
        self._tokens1 = 0
        self.steady_seconds = 0.0
        self.steady_tokens = 0
        self._val_seconds = 0.0  # validation time so far (left out of every rate)
        # (training seconds, tokens seen) at the end of each optimizer step: the rate over the second
        # half of a run leaves out the one-time costs of its first steps (autotuning, allocator growth)
        self.step_marks: list[tuple[float, int]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._tokens0 = time.perf_counter(), int(getattr(pl_module, "tokens_seen", 0))
        self._step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None:
            return
        # Lightning hands callbacks the loss divided by the accumulation factor.
        self._window.append(float(loss) * trainer.accumulate_grad_batches)
        if trainer.global_step != self._step:  # an optimizer step completed on this micro-batch
            self._step = trainer.global_step
            self.losses.append(sum(self._window) / len(self._window))
            self._window = []
            now, tokens = time.perf_counter(), int(getattr(pl_module, "tokens_seen", 0))
            self.step_marks.append((now - self._val_seconds, tokens))
            if self._t1 is None:  # float(loss) above waited for the device: the step is done
                self._t1, self._tokens1 = now, tokens
                self.first_step_seconds = self._t1 - self._t0

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._val_t0 = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            val_seconds = time.perf_counter() - self._val_t0
            self._t0 += val_seconds  # validation time is not training time
            self._val_seconds += val_seconds
            if self._t1 is not None:
                self._t1 += val_seconds
        if not trainer.sanity_checking:
            self.last_val_step = trainer.global_step

    def second_half_rate(self) -> float | None:
        """Tokens/s (this process) from the middle optimizer step to the last; None under 4 steps."""
        if len(self.step_marks) < 4:
            return None
        (t0, n0), (t1, n1) = self.step_marks[len(self.step_marks) // 2], self.step_marks[-1]
        return (n1 - n0) / (t1 - t0) if t1 > t0 and n1 > n0 else None

    def step_seconds(self) -> list[float]:
        """Wall seconds of each optimizer step after the first (validation left out), in order: where a
        rate's outliers are (a slow step, a hiccup) shows here, not in a mean."""
        return [t1 - t0 for (t0, _), (t1, _) in itertools.pairwise(self.step_marks)]

    def median_step_rate(self) -> float | None:
        """Tokens/s (this process) of the median step after the first; None under 3 steps."""
        rates = sorted((n1 - n0) / (t1 - t0) for (t0, n0), (t1, n1) in itertools.pairwise(self.step_marks)
                       if t1 > t0)
        return rates[len(rates) // 2] if len(rates) >= 2 else None

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        end, tokens = time.perf_counter(), int(getattr(pl_module, "tokens_seen", 0))
        self.train_seconds, self.tokens = end - self._t0, tokens - self._tokens0
        if self._t1 is not None:
            self.steady_seconds, self.steady_tokens = end - self._t1, tokens - self._tokens1


# ---------------------------------------------------------------- logger
def wandb_key_configured() -> bool:
    """True if W&B could log in: WANDB_API_KEY, or a ~/.netrc ($NETRC) entry for the W&B host."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    try:
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host or "api.wandb.ai")
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def wandb_mode(configured: str | None) -> str:
    """`logger.mode` if set, else $WANDB_MODE if set, else online with a key and offline without."""
    return configured or os.environ.get("WANDB_MODE") or ("online" if wandb_key_configured() else "offline")


def build_logger(cfg: RecipeConfig, run_dir: str | os.PathLike) -> tuple[Logger, str]:
    """The run's logger, writing into `run_dir`, and its own directory (the W&B run's folder
    `<run_dir>/wandb/<run>`, or `run_dir` itself for the CSV logger's metrics.csv)."""
    lc = cfg.logger
    run_dir = Path(run_dir)
    if not lc.wandb:
        logger: Logger = CSVLogger(run_dir, name="", version="")
        return logger, str(run_dir.resolve())
    mode = wandb_mode(lc.mode)
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    logger = WandbLogger(project=lc.project, name=lc.name or run_dir.name, save_dir=str(run_dir), mode=mode)
    # Lightning always passes anonymous=None, which wandb >= 0.19 warns about on every run.
    if logger._wandb_init.get("anonymous", "") is None:
        del logger._wandb_init["anonymous"]
    run = logger.experiment  # starts the run now, so that its directory can be printed
    # distributed: on ranks > 0 Lightning hands out a dummy experiment (its `dir` is a no-op method).
    if mode == "disabled" or not isinstance(getattr(run, "dir", None), str) or not run.dir:
        return logger, str(run_dir.resolve())
    return logger, str(Path(run.dir).parent.resolve())  # run.dir is <save_dir>/wandb/<run>/files


def _finish(logger: Logger, failed: bool) -> None:
    if isinstance(logger, WandbLogger) and logger._experiment is not None:
        logger.experiment.finish(exit_code=1 if failed else 0)


# ---------------------------------------------------------------- parts
def _data_module(cfg: RecipeConfig) -> Any:
    from qgl.data import TextDataModule

    d = cfg.data
    source = "corpus" if d.source in ("embedded", "corpus") else d.source
    tokenizer = d.tokenizer or cfg.model.hf_path or "byte"
    return TextDataModule(source=source, block_size=d.block_size, batch_size=d.batch_size,
                          num_workers=d.num_workers, val_fraction=d.val_fraction, seed=cfg.seed,
                          tokenizer=tokenizer, text_field=d.text_field, format=d.format, packing=d.packing)


def _vocab_size(cfg: RecipeConfig, tokenizer_vocab: int) -> int | None:
    """None (the config's vocabulary) unless the tokenizer's is larger: then it, rounded up to 64."""
    from qgl.models.llama import LLAMA_CONFIGS

    if cfg.model.hf_path is not None or tokenizer_vocab <= LLAMA_CONFIGS[cfg.model.name].vocab_size:
        return None
    return -(-tokenizer_vocab // 64) * 64


def _module(cfg: RecipeConfig, tokenizer_vocab: int) -> L.LightningModule:
    from qgl.lightning.module import CausalLMModule

    o = cfg.optim
    return CausalLMModule(model=cfg.model.name, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.betas),
                          warmup_steps=o.warmup_steps, max_steps=cfg.trainer.max_steps,
                          min_lr_ratio=o.min_lr_ratio, hf_path=cfg.model.hf_path,
                          activation_checkpointing=cfg.model.activation_checkpointing,
                          vocab_size=_vocab_size(cfg, tokenizer_vocab), dtype=cfg.model.dtype)


def _callbacks(cfg: RecipeConfig, extra: Sequence[Callback] = (), run_dir: str = ".",
               checkpoint_dir: str | os.PathLike | None = None
               ) -> tuple[list[Callback], AtomicModelCheckpoint, RunStats, Any]:
    from qgl.callbacks import MemoryMonitor, method_callbacks
    from qgl.plan import predicted_parts

    section = lambda c: OmegaConf.to_container(OmegaConf.structured(c))
    callbacks = [*method_callbacks(cfg.method, section(cfg.qgalore), section(cfg.lora), cfg.seed), *extra]
    memory = MemoryMonitor(print_table=False, predicted=predicted_parts(cfg),
                           snapshot_step=cfg.trainer.memory_snapshot_step, snapshot_dir=run_dir)
    stats = RunStats()
    c = cfg.checkpoint
    # The run dir is the run's own: no version counter (last-v1.ckpt) is ever needed.
    ckpt = AtomicModelCheckpoint(dirpath=checkpoint_dir or c.dir, filename="step{step:06d}",
                                 auto_insert_metric_name=False, every_n_train_steps=c.every_n_steps or None,
                                 save_last=c.save_last, save_top_k=1 if c.every_n_steps else 0,
                                 enable_version_counter=False)
    # The guard before the checkpoint callback (Lightning runs checkpoint callbacks last anyway):
    # a non-finite step raises before its state could be saved.
    callbacks += [memory, stats, RichProgressBar(), NonFiniteGuard(), RecipeRecord(cfg), ckpt]
    return callbacks, ckpt, stats, memory


def _profiler(name: str | None, run_dir: str) -> Profiler | None:
    """Lightning's profiler `name`, its report written to `<run_dir>/fit-profile.txt` at the end of fit.
    "pytorch" records steps 3-5 (torch.profiler's wait 1, warmup 1, active 3, Lightning's default):
    CPU and CUDA time per operator, sorted by the device's time where there is one."""
    if name is None:
        return None
    kinds = {"simple": SimpleProfiler, "advanced": AdvancedProfiler, "pytorch": PyTorchProfiler}
    options: dict[str, Any] = {"dirpath": run_dir, "filename": "profile"}
    if name == "pytorch":
        options.update(row_limit=40, sort_by_key="cuda_time_total" if torch.cuda.is_available()
                       else "cpu_time_total")
    return kinds[name](**options)


def _trainer(cfg: RecipeConfig, callbacks: list[Callback], logger: Logger, run_dir: str) -> L.Trainer:
    t = cfg.trainer
    every = (t.val_check_interval or t.max_steps) * t.accumulate_grad_batches  # Lightning counts batches
    return L.Trainer(max_steps=t.max_steps, precision=t.precision, accelerator=t.accelerator,
                     devices=t.devices, strategy=t.strategy, num_nodes=t.num_nodes,
                     log_every_n_steps=t.log_every_n_steps, val_check_interval=every,
                     check_val_every_n_epoch=None,
                     limit_val_batches=1.0 if t.limit_val_batches is None else t.limit_val_batches,
                     gradient_clip_val=t.gradient_clip_val, accumulate_grad_batches=t.accumulate_grad_batches,
                     callbacks=callbacks, logger=logger, default_root_dir=run_dir,
                     profiler=_profiler(t.profiler, run_dir))


# ---------------------------------------------------------------- run
def run(cfg: RecipeConfig, extra_callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train `cfg` and return the summary numbers (also printed as a table). `extra_callbacks` join
    the method's (`qgl.callbacks.method_callbacks`), before the monitors.

    Raises (each a one-line message, before anything is built where it can be known then):
    `RunSetupError` (unwritable output, nothing to resume, a refused change on resume),
    `CheckpointError` (an unusable checkpoint), `qgl.data.dataset.DataError`, `NonFiniteError`."""
    console = Console()
    paths = resolve_run(cfg)
    if paths.resume_from is not None:
        for line in check_resume(cfg, paths.resume_from):
            console.print(f"[yellow]warning:[/yellow] {line}", soft_wrap=True)
    prepare_dirs(cfg, paths)
    share_with_launched_ranks(paths)
    L.seed_everything(cfg.seed, workers=True)
    dm = _data_module(cfg)
    module = _module(cfg, dm.vocab_size)
    logger, log_dir = build_logger(cfg, paths.run_dir)
    run_dir = str(paths.run_dir.resolve())
    rank_zero = rank_zero_only.rank == 0  # distributed: Lightning's launcher re-runs this on every rank
    if rank_zero:
        console.print(f"[bold]run directory:[/bold] {run_dir}"
                      + (f" (resuming {paths.resume_from})" if paths.resume_from else ""), soft_wrap=True)
    if rank_zero and os.environ.get("WANDB_MODE") == "offline" and isinstance(logger, WandbLogger):
        console.print(f"W&B runs offline: upload later with `wandb sync {log_dir}`", soft_wrap=True)
    failed = True
    try:
        callbacks, ckpt, stats, memory = _callbacks(cfg, extra_callbacks, run_dir, paths.checkpoint_dir)
        logger.log_hyperparams(OmegaConf.to_container(OmegaConf.structured(cfg)))
        trainer = _trainer(cfg, callbacks, logger, run_dir)
        start = time.perf_counter()
        resume = None if paths.resume_from is None else str(paths.resume_from)
        with warnings.catch_warnings():
            # A resumed run appends to its own run dir's metrics.csv: that dir is not empty, by design.
            warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
            _fit(trainer, module, dm, resume, ckpt)
        if cfg.trainer.limit_val_batches != 0 and stats.last_val_step != trainer.global_step:
            trainer.validate(module, datamodule=dm, verbose=False)  # the summary reports the final model
        summary = _summary(cfg, trainer, stats, memory, ckpt, run_dir, time.perf_counter() - start)
        summary["log_dir"] = log_dir
        failed = False
    finally:
        _finish(logger, failed)
    if trainer.is_global_zero:  # distributed: one summary, from rank 0
        _print_summary(console, summary)
    return summary


def _fit(trainer: L.Trainer, module: L.LightningModule, dm: Any, ckpt_path: str | None,
         ckpt: AtomicModelCheckpoint) -> None:
    """`trainer.fit`; a non-finite step (the guard's, or an optimizer's own FloatingPointError) is
    re-raised as one `NonFiniteError` line that names the step and the newest checkpoint kept."""
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
    except FloatingPointError as e:
        line = str(e) if isinstance(e, NonFiniteError) else f"at step {trainer.global_step + 1}: {e}"
        kept = [p for p in (ckpt.last_model_path, ckpt.best_model_path) if p and os.path.exists(p)]
        if ckpt_path and not kept:
            kept = [ckpt_path]
        newest = max(kept, key=os.path.getmtime) if kept else None
        where = f"; newest good checkpoint: {newest}" if newest else "; no checkpoint was written"
        raise NonFiniteError(line + where) from e


def _float(metrics: dict[str, Any], key: str) -> float | None:
    return float(metrics[key]) if key in metrics else None


def _summary(cfg: RecipeConfig, trainer: L.Trainer, stats: RunStats, memory: Any,
             ckpt: AtomicModelCheckpoint, run_dir: str, seconds: float) -> dict[str, Any]:
    metrics = trainer.callback_metrics
    tail = stats.losses[-10:]  # the mean of the last steps: one step's loss is noisy
    val_loss = _float(metrics, "val/loss")
    val_ppl = _float(metrics, "val/ppl") or (math.exp(val_loss) if val_loss is not None else None)
    mem = memory.summary()
    world = trainer.world_size  # distributed: every rank reads as many tokens (DistributedSampler)
    subspace = next((cb.summary() for cb in trainer.callbacks if type(cb).__name__ == "SubspaceMonitor"), {})
    last = ckpt.last_model_path if ckpt.last_model_path and os.path.exists(ckpt.last_model_path) else None
    return {
        "method": cfg.method, "steps": trainer.global_step,
        "train_loss_first": stats.losses[0] if stats.losses else None,
        "train_loss": sum(tail) / len(tail) if tail else None, "train_loss_steps": len(tail),
        "val_loss": val_loss, "val_ppl": val_ppl,
        "tokens_per_sec": world * stats.tokens / stats.train_seconds if stats.train_seconds > 0 else None,
        "tokens_per_sec_after_first_step": (world * stats.steady_tokens / stats.steady_seconds
                                            if stats.steady_seconds > 0 and stats.steady_tokens else None),
        "tokens_per_sec_second_half": (rate := stats.second_half_rate()) and world * rate,
        "tokens_per_sec_median_step": (rate := stats.median_step_rate()) and world * rate,
        "step_seconds": stats.step_seconds(),
        "peak_memory_bytes": mem.get("peak"), "predicted_peak_bytes": memory.predicted.get("peak"),
        "memory_kind": "cuda" if trainer.strategy.root_device.type == "cuda" else "rss",
        "memory_parts": {k: v for k, v in mem.items() if k != "peak"},
        "first_step_seconds": stats.first_step_seconds,
        "svd_total": subspace.get("svd_total"), "svd_seconds": subspace.get("svd_seconds"),
        "galore_svds": subspace.get("galore_svds"),
        "svd_saved_frac": subspace.get("svd_saved_frac"),
        "subspace_heatmap": subspace.get("heatmap") and os.path.abspath(subspace["heatmap"]),
        "run_dir": run_dir, "checkpoint_dir": str(Path(ckpt.dirpath or cfg.checkpoint.dir).resolve()),
        "last_checkpoint": last, "periodic_checkpoint": ckpt.best_model_path or None,
        "wall_seconds": seconds, "train_losses": list(stats.losses),
    }


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _print_summary(console: Console, s: dict[str, Any]) -> None:
    table = Table(title=f"qgl run summary ({s['method']}, {s['steps']} steps, {s['wall_seconds']:.1f} s)",
                  show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    table.add_row("train loss", f"{_fmt(s['train_loss_first'])} (first step) -> {_fmt(s['train_loss'])} "
                  f"(mean of the last {s['train_loss_steps']})")
    table.add_row("val loss / perplexity", f"{_fmt(s['val_loss'])} / {_fmt(s['val_ppl'], '.2f')}")
    rates = f"{_fmt(s['tokens_per_sec'], ',.0f')}; {_fmt(s['tokens_per_sec_after_first_step'], ',.0f')}"
    table.add_row("tokens/s (training; after the first step)", rates)
    if s.get("first_step_seconds") is not None:
        table.add_row("first optimizer step (every layer's first SVD)", f"{s['first_step_seconds']:.2f} s")
    kind = "GPU max allocated" if s["memory_kind"] == "cuda" else "process RSS"
    parts = ", ".join(f"{k} {v / _MIB:,.1f}" for k, v in s["memory_parts"].items() if v)
    peak = s["peak_memory_bytes"]
    table.add_row(f"peak memory ({kind})",
                  f"{_fmt(peak and peak / _MIB, ',.1f')} MiB" + (f" ({parts})" if parts else ""))
    if s.get("predicted_peak_bytes"):
        table.add_row("predicted GPU peak (qgl plan)", f"{s['predicted_peak_bytes'] / _MIB:,.1f} MiB")
    if s["svd_total"] is not None:
        saved = 100 * (s["svd_saved_frac"] or 0)
        table.add_row("SVDs run / GaLore schedule",
                      f"{s['svd_total']} / {s['galore_svds']} ({saved:.0f}% saved)"
                      + (f"; {s['svd_seconds']:.2f} s in SVDs" if s.get("svd_seconds") is not None else ""))
    if s["subspace_heatmap"]:
        table.add_row("subspace heatmap", s["subspace_heatmap"])
    table.add_row("run dir", s["run_dir"])
    table.add_row("checkpoints", "\n".join(p for p in (s["last_checkpoint"], s["periodic_checkpoint"]) if p)
                  or s["checkpoint_dir"])
    console.print(table)
