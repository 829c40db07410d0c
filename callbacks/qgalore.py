"""QGaLoreCallback: Q-GaLore on any LightningModule.

    trainer = L.Trainer(callbacks=[QGaLoreCallback(rank=256)])
    trainer.fit(module)

At `setup` the callback checks that the run can combine with Q-GaLore, quantizes the chosen
`nn.Linear`s in place (`qgl.nn.quantize_model`, before Lightning restores a checkpoint, so INT8
buffers load into the quantized structure). It is an `OptimizerSwap` (`callbacks/swap.py`): the
user's optimizer is built, its lr, betas, eps and weight decay are kept, and `QGaLoreAdamW` takes
its place. The user's LR schedulers are kept as they are, bound to the user's optimizer; the
callback copies that optimizer's lr into every QGaLoreAdamW group before each batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer

from qgl.callbacks._lightning_private import should_accumulate
from qgl.callbacks.distributed import DistributedQGaLore, check_strategy, prepare_ddp
from qgl.callbacks.swap import OptimizerSwap, unwrap, wrap
from qgl.optim import QGaLoreAdamW, make_param_groups
from qgl.optim.settings import GALORE, QGALORE, QGaLoreSettings

# Settings that shape the model or the optimizer state: a checkpoint made with other values cannot resume.
_STRUCTURAL = ("rank", "target_modules", "exclude", "quantize_weights", "group_size", "symmetric")
_GALORE_OPTIONS = tuple(k for k in GALORE if k != "rank")
_D = QGALORE  # QGaLoreSettings' defaults


class QGaLoreCallback(OptimizerSwap):
    """Train any LightningModule with Q-GaLore (INT8 weights, INT4 projections, 8-bit Adam).

    Args:
        rank: rank of the gradient projection of the targeted linear weights.
        target_modules: module-name patterns (substrings, or "re:<regex>") of the linears to
            quantize and project.
        exclude: module-name patterns left alone (neither quantized nor projected).
        quantize_weights: store the targeted weights in INT8 (`qgl.nn.QLinear`).
        group_size: elements per INT8 quantization group. symmetric: symmetric INT8 groups.
        update_proj_gap: steps between subspace refreshes (before adaptive lengthening).
        scale: GaLore's alpha, the factor of the projected-back update.
        proj_quant: store the projections in INT4. proj_group_size: their group size.
        adaptive: lengthen a layer's gap while its subspace stays put (`cos_threshold`,
            `gamma_proj`, `queue_size`, capped by `max_gap`; see `qgl.optim.refresh`).
        svd_method: "randomized" (warm-started from the previous P after the first refresh) or
            "full" (exact). refresh_metric: "leading" or "subspace" (what the refresh compares;
            docs/svd.md).
        (Defaults, ranges and choices: `qgl.optim.settings.QGaLoreSettings`; a bad value raises a
        one-line `ValueError` (`SettingError`) here, at construction.)
        optim_bits: 8 or 32-bit Adam moments; tensors under `min_8bit_size` elements keep fp32.
        layerwise: update each parameter in backward and free its gradient at once.
        layerwise_clip_norm: per-parameter gradient clipping under `layerwise` (global clipping
            needs every gradient at once; set `Trainer(gradient_clip_val=None)`).
        seed: seed of the stochastic rounding of the INT8 weights.
        offload: optimizer states in host memory between updates: None/False (off), True or "cpu"
            (pinned, prefetched), "paged" (bitsandbytes unified memory); see `qgl.optim.offload`.
        subspace_monitor: add a `SubspaceMonitor` if the trainer has none.
        shard_state: under DDP, each parameter's optimizer state (moments, projector) lives on one
            owner rank, which updates it and broadcasts the new weight (`qgl.optim.distributed`);
            False: all-reduce, every rank holds every state.
        cuda_graphs: replay each matrix's update as a CUDA graph between its refreshes (CUDA, 8-bit
            moments, no offload, single process; `qgl.optim.graphed`).

    From the module's optimizer the callback keeps lr, betas (when it has them), eps and
    weight_decay; weight decay then applies to matrices only, not to biases and norms
    (`qgl.optim.make_param_groups`). The optimizer must be one, with one param group, over every
    trainable parameter. Its LR schedulers keep stepping it: it is never stepped itself, so its
    state stays empty and its memory is its param-group dicts only; its lr is copied into
    QGaLoreAdamW at every `on_train_batch_start`, i.e. the lr the next update uses.

    Runs on one device or under DDP (`Trainer(strategy="ddp", devices=N)`: gradients averaged per
    parameter in backward, see `qgl.callbacks.distributed`). Refused, with a ValueError saying
    what to change: FSDP, FSDP2 and other strategies; under DDP without `layerwise` and with
    `shard_state`, global clipping and "16-mixed" (rank-local gradients); with `layerwise`,
    `gradient_clip_val`, precision "16-mixed" (GradScaler cannot unscale gradients the hooks
    consumed; use "bf16-mixed") and manual optimization.
    """

    # The keywords are QGaLoreSettings' fields with its defaults (`_D`), which also checks them (a test
    # holds the two in step); seed and subspace_monitor are the callback's own.
    def __init__(self, rank: int = _D["rank"], target_modules: Sequence[str] = _D["target_modules"],
                 exclude: Sequence[str] = _D["exclude"], quantize_weights: bool = _D["quantize_weights"],
                 group_size: int = _D["group_size"], symmetric: bool = _D["symmetric"],
                 update_proj_gap: int = _D["update_proj_gap"], scale: float = _D["scale"],
                 proj_quant: bool = _D["proj_quant"], proj_group_size: int = _D["proj_group_size"],
                 adaptive: bool = _D["adaptive"], cos_threshold: float = _D["cos_threshold"],
                 gamma_proj: float = _D["gamma_proj"], queue_size: int = _D["queue_size"],
                 max_gap: int | None = _D["max_gap"], svd_method: str = _D["svd_method"],
                 refresh_metric: str = _D["refresh_metric"],
                 optim_bits: int = _D["optim_bits"], min_8bit_size: int = _D["min_8bit_size"],
                 layerwise: bool = _D["layerwise"],
                 layerwise_clip_norm: float | None = _D["layerwise_clip_norm"], seed: int = 0,
                 subspace_monitor: bool = True, offload: bool | str | None = _D["offload"],
                 shard_state: bool = _D["shard_state"], cuda_graphs: bool = _D["cuda_graphs"]) -> None:
        # Checked here, at construction (a bad value never reaches the first backward hook).
        self.settings = QGaLoreSettings(
            rank=rank, target_modules=_listed(target_modules), exclude=_listed(exclude),
            quantize_weights=quantize_weights, group_size=group_size, symmetric=symmetric,
            update_proj_gap=update_proj_gap, scale=scale, proj_quant=proj_quant,
            proj_group_size=proj_group_size, adaptive=adaptive, cos_threshold=cos_threshold,
            gamma_proj=gamma_proj, queue_size=queue_size, max_gap=max_gap, svd_method=svd_method,
            refresh_metric=refresh_metric,
            optim_bits=optim_bits, min_8bit_size=min_8bit_size, layerwise=layerwise,
            layerwise_clip_norm=layerwise_clip_norm, offload=offload, shard_state=shard_state,
            cuda_graphs=cuda_graphs)
        chosen = {k: tuple(v) if isinstance(v, list) else v
                  for k, v in dataclasses.asdict(self.settings).items()}
        self.config: dict[str, Any] = {**chosen, "seed": seed, "subspace_monitor": subspace_monitor}
        super().__init__()
        self.optimizer: QGaLoreAdamW | None = None

    # ------------------------------------------------------------------ set-up

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str = "fit") -> None:
        if stage == "fit":
            self._check_combination(trainer, pl_module)
            from qgl.nn import check_rank

            c = self.config  # a rank no targeted layer can hold is refused before the surgery
            check_rank(pl_module, c["rank"], c["target_modules"], c["exclude"])
            if self.config["subspace_monitor"]:
                _add_subspace_monitor(trainer)
        if self.config["quantize_weights"]:
            self._quantize(pl_module)
            if is_overridden("configure_model", pl_module):
                # Layers built in configure_model (it runs after setup, before the restore) too.
                def configure_model(user: Any) -> None:
                    user()
                    self._quantize(pl_module)

                wrap(pl_module, "configure_model", configure_model, once=True)
        super().setup(trainer, pl_module, stage)  # the optimizer swap
        if isinstance(trainer.strategy, DDPStrategy):  # distributed: keep DDP off qgl's tensors
            prepare_ddp(trainer, pl_module)
            if stage == "fit" and not any(isinstance(cb, DistributedQGaLore) for cb in trainer.callbacks):
                trainer.callbacks.append(DistributedQGaLore(shard=self.config["shard_state"]))

    def _check_combination(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # distributed (qgl/callbacks/distributed.py): single device or DDP; others refused there.
        self._ddp = check_strategy(trainer, self.config)
        if not self.config["layerwise"]:
            return
        if trainer.gradient_clip_val:
            raise ValueError(
                f"QGaLoreCallback(layerwise=True) cannot clip the global gradient norm "
                f"(Trainer(gradient_clip_val={trainer.gradient_clip_val})): layer-wise updates free each "
                "gradient in backward. Set gradient_clip_val=None, or layerwise=False, or use "
                "QGaLoreCallback(layerwise_clip_norm=...) to clip each parameter's gradient")
        if trainer.precision == "16-mixed":
            raise ValueError(
                "QGaLoreCallback(layerwise=True) cannot run with precision='16-mixed': GradScaler cannot "
                "unscale gradients that the backward hooks already consumed. Use precision='bf16-mixed', "
                "or layerwise=False")
        if not pl_module.automatic_optimization:
            raise ValueError(
                "QGaLoreCallback(layerwise=True) needs automatic optimization (it decides from Lightning's "
                "accumulation schedule when the hooks step); set layerwise=False for manual optimization")

    def _quantize(self, pl_module: pl.LightningModule) -> None:
        from qgl.nn import quantize_model

        c = self.config
        quantize_model(pl_module, target_modules=c["target_modules"], exclude=c["exclude"],
                       group_size=c["group_size"], symmetric=c["symmetric"])

    # ------------------------------------------------------------------ the optimizer swap

    def check_user_optimizer(self, pl_module: pl.LightningModule, user: Optimizer) -> None:
        """One param group over every trainable parameter (see the class docstring)."""
        if len(user.param_groups) != 1:
            raise ValueError(
                f"QGaLoreCallback builds its own param groups (projected weights, decayed and non-decayed "
                f"parameters); the optimizer has {len(user.param_groups)}. Return one with a single group, "
                "e.g. torch.optim.AdamW(self.parameters(), lr=..., weight_decay=...)")
        covered = {id(p) for p in user.param_groups[0]["params"]}
        missing = [n for n, p in pl_module.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ValueError(f"the optimizer leaves out {len(missing)} trainable parameters "
                             f"({missing[:3]}...); QGaLoreCallback optimizes every trainable parameter: "
                             "set requires_grad=False on the ones to freeze")

    def build_optimizer(self, pl_module: pl.LightningModule, user: Optimizer,
                        device: torch.device) -> QGaLoreAdamW:
        """QGaLoreAdamW with the user's lr, betas, eps and weight decay (see the class docstring)."""
        c, group = self.config, user.param_groups[0]
        kept = dict(lr=float(group["lr"]), eps=group.get("eps", 1e-8),
                    weight_decay=group.get("weight_decay", 0.0))
        if "betas" in group:
            kept["betas"] = tuple(float(b) for b in group["betas"])
        else:
            rank_zero_warn(f"QGaLoreCallback replaces {type(user).__name__} by AdamW; kept lr and "
                           "weight_decay, betas take QGaLoreAdamW's defaults")
        groups = make_param_groups(pl_module, c["rank"], c["target_modules"], c["exclude"],
                                   weight_decay=kept["weight_decay"], **{k: c[k] for k in _GALORE_OPTIONS})
        return QGaLoreAdamW(groups, **kept, optim_bits=c["optim_bits"], min_8bit_size=c["min_8bit_size"],
                            seed=c["seed"], layerwise=c["layerwise"],
                            layerwise_clip_norm=c["layerwise_clip_norm"], offload=c["offload"],
                            cuda_graphs=c["cuda_graphs"])

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)  # the user's lr, every group
        if self.optimizer.layerwise is not None:
            # Micro-batches inside an accumulation window sum into .grad; the last one's hooks step.
            self.optimizer.layerwise.defer = should_accumulate(trainer)

    def restore_module(self, pl_module: pl.LightningModule) -> None:
        """Called at teardown and on_exception: the module's own methods back, no backward hooks left."""
        super().restore_module(pl_module)
        unwrap(pl_module, "configure_model")
        # A later fit builds a new optimizer; this one's backward hooks must not step the weights too.
        if self.optimizer is not None and self.optimizer.layerwise is not None:
            self.optimizer.layerwise.remove()

    # ------------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        return {"config": dict(self.config), **super().state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["config"]
        norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v
        changed = {k: (saved[k], v) for k, v in self.config.items()
                   if k in saved and norm(saved[k]) != norm(v)}
        structural = {k: v for k, v in changed.items() if k in _STRUCTURAL}
        if structural:
            raise ValueError("the checkpoint was made with other QGaLoreCallback settings "
                             f"(checkpoint, now): {structural}; resume with the checkpoint's values")
        if changed:
            rank_zero_warn(f"resuming with other QGaLoreCallback settings (checkpoint, now): {changed}; "
                           "the projected groups keep the checkpoint's GaLore options (saved in the "
                           "optimizer state)")
        super().load_state_dict(state_dict)


def _listed(patterns: Sequence[str]) -> Any:
    # A lone string stays a string, so that the schema refuses it (list("attn") would be 4 patterns).
    return patterns if isinstance(patterns, str) else list(patterns)


def _add_subspace_monitor(trainer: pl.Trainer) -> None:
    from lightning.pytorch.callbacks import Checkpoint

    from qgl.callbacks.subspace import SubspaceMonitor

    if any(isinstance(cb, SubspaceMonitor) for cb in trainer.callbacks):
        return
    # Before the checkpoint callbacks, so that a checkpoint holds the history of its own step.
    checkpoints = [i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, Checkpoint)]
    at = checkpoints[0] if checkpoints else len(trainer.callbacks)
    trainer.callbacks.insert(at, SubspaceMonitor())
