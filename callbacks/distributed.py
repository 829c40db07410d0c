"""Q-GaLore on Lightning's strategies: which ones run, and the DDP wiring.

`check_strategy` is called by `QGaLoreCallback` at setup: a single device and DDP (`ddp`,
`ddp_spawn`, `ddp_fork`, `ddp_notebook`, on any number of nodes) run; FSDP, ModelParallel
(FSDP2), DeepSpeed and other strategies are refused with a one-line ValueError naming the strategy
that runs (docs/internals.md, "Distributed", says why INT8 weights under FSDP2 are not there yet).

Under DDP, `prepare_ddp` (also at setup) keeps Lightning's `DistributedDataParallel` away from the
parameters and INT8 buffers qgl manages (every trainable parameter: `QGaLoreAdamW` steps them all,
from the post-accumulate-grad hooks of `qgl.optim.distributed.DistributedLayerwise`); as nothing
is then left for DDP's reducer, the module is not wrapped (DDP refuses a module without gradients
to reduce), and the initial broadcast from rank 0 is qgl's (`broadcast_weights`: INT8 codes and
scales, never a stride-0 gradient carrier). `DistributedQGaLore` calls `QGaLoreAdamW.distribute()` at
fit start; the optimizer Lightning holds then does the collectives itself (`step`, and
`consolidate_state_dict` before Lightning's `state_dict()` of a checkpoint).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

_RUNS_ON = "use strategy='ddp' (optimizer state sharded by matrix) or a single device"


def check_strategy(trainer: pl.Trainer, config: dict[str, Any]) -> bool:
    """Raise a ValueError if `QGaLoreCallback(**config)` cannot run on the trainer's strategy.
    Returns True under DDP (any number of processes), False on a single device."""
    strategy = trainer.strategy
    name = type(strategy).__name__
    if isinstance(strategy, SingleDeviceStrategy) and trainer.world_size == 1:
        return False
    if not isinstance(strategy, DDPStrategy):
        why = {"FSDPStrategy": "FSDP shards each weight across ranks, but a Q-GaLore update needs the whole "
                               "gradient matrix (its SVD) and an INT8 weight's whole quantization groups",
               "ModelParallelStrategy": "FSDP2 (fully_shard) shards each weight across ranks, but a Q-GaLore "
                                        "update needs the whole gradient matrix and INT8 weight groups"}
        reason = why.get(name, "it is not data-parallel")
        raise ValueError(f"QGaLoreCallback does not run under {name} ({reason}); {_RUNS_ON}")
    if not config["layerwise"] and config["shard_state"]:
        # Each rank then holds only its owned gradients: a global norm or GradScaler's inf check
        # would be rank-local.
        if trainer.gradient_clip_val:
            raise ValueError("QGaLoreCallback(layerwise=False, shard_state=True) under DDP cannot clip the "
                             "global gradient norm (each rank holds its own matrices' gradients); set "
                             "shard_state=False, or layerwise_clip_norm with layerwise=True")
        if trainer.precision == "16-mixed":
            raise ValueError("QGaLoreCallback(layerwise=False, shard_state=True) under DDP cannot run "
                             "with precision='16-mixed' (GradScaler's check would be rank-local); use "
                             "bf16-mixed or shard_state=False")
    return True


def managed_names(module: torch.nn.Module) -> list[str]:
    """Names of what qgl synchronizes itself: every trainable parameter, every QLinear's carrier
    and INT8 buffers (DDP's `_ddp_params_and_buffers_to_ignore` format)."""
    from qgl.quant import storage_of

    names = [n for n, p in module.named_parameters() if p.requires_grad]
    for prefix, sub in module.named_modules():
        if storage_of(getattr(sub, "weight", None)) is not None:  # a QLinear: carrier + INT8 buffers
            dot = f"{prefix}." if prefix else ""
            names += [f"{dot}weight"] + [f"{dot}{b}" for b, t in sub.named_buffers(recurse=False)
                                         if t is not None]
    return sorted(set(names))


def prepare_ddp(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Keep DDP off qgl's tensors (module docstring). Called at setup, before Lightning wraps the model."""
    from torch.nn.parallel import DistributedDataParallel

    strategy = trainer.strategy
    ignore = lambda: DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        pl_module, managed_names(pl_module))
    ignore()  # validate/test: Lightning's own module-state broadcast then skips the carriers
    original = strategy.configure_ddp
    if getattr(original, "_qgl", False):
        return

    def configure_ddp() -> None:
        ignore()  # again: configure_model may have built (and quantized) layers since setup
        left = [n for n, p in pl_module.named_parameters()
                if p.requires_grad and n not in pl_module._ddp_params_and_buffers_to_ignore]
        if left:
            original()
        # else: DDP would have nothing to reduce; the LightningModule stays unwrapped.

    configure_ddp._qgl = True  # type: ignore[attr-defined]
    strategy.configure_ddp = configure_ddp


class DistributedQGaLore(Callback):
    """`QGaLoreAdamW.distribute()` at fit start (after Lightning set up the optimizer, before it
    restores a checkpoint), after broadcasting rank 0's weights and buffers.

    Args:
        shard: optimizer state sharded by matrix (`qgl.optim.distributed`), else all-reduce.
    """

    def __init__(self, shard: bool = True) -> None:
        self.shard = shard
        self.driver: Any = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from qgl.optim.distributed import broadcast_weights
        from qgl.quant import storage_of

        optimizer = next(o for o in trainer.optimizers if hasattr(o, "subspace_stats"))
        # Every rank starts from rank 0's model: parameters (never a stride-0 carrier: its QLinear's
        # INT8 codes and scales are among the buffers) and buffers.
        params = [p for p in pl_module.parameters() if storage_of(p) is None]
        broadcast_weights([*params, *pl_module.buffers()])
        self.driver = optimizer.distribute(shard=self.shard)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        from qgl.callbacks._lightning_private import should_accumulate

        if self.driver is not None and self.driver.driver is None:  # not layer-wise: no reduce mid-window
            self.driver.defer = should_accumulate(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.driver is not None:
            self.driver.remove()
            self.driver = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        if self.driver is not None:
            self.driver.remove(finish=False)  # pending communication may never complete now
            self.driver = None
