"""The training methods of a recipe's `method` key, as Lightning callbacks on any LightningModule.

    callbacks = method_callbacks("qlora", qgalore={...}, lora={...}, seed=0)

| method | callbacks | weights | optimizer |
|---|---|---|---|
| full (alias adamw) | none | the module's, fp32 masters | the module's (torch AdamW) |
| adamw8bit | AdamW8bitCallback | as full | bitsandbytes AdamW8bit |
| lora | LoRACallback(base="bf16") | bf16 frozen + fp32 adapters | the module's (adapters) |
| qlora | LoRACallback(base="nf4"), AdamW8bitCallback(paged=True) | NF4 frozen + fp32 adapters | paged 8-bit |
| galore | QGaLoreCallback(**GALORE) | float, not quantized | GaLore, 8-bit moments |
| qgalore | QGaLoreCallback | INT8 | Q-GaLore |

Precision is the recipe's (`trainer.precision`; bf16-mixed in the GPU recipes). LoRA freezes every
parameter outside the adapters (the recipe's `lora.trainable` patterns excepted); paging exists on
CUDA only, elsewhere qlora's optimizer is the plain `AdamW8bit`.

The callbacks hold no algorithm: LoRA is `qgl.nn.apply_lora`, the optimizers are bitsandbytes' and
`qgl.optim`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.optim import Optimizer

from qgl.callbacks.qgalore import QGaLoreCallback
from qgl.callbacks.swap import OptimizerSwap, unwrap, wrap

METHODS = ("full", "adamw8bit", "lora", "qlora", "galore", "qgalore")
ALIASES = {"adamw": "full"}
# What makes `galore` GaLore (Zhao et al., 2024) rather than Q-GaLore: float weights, float
# projections, a fixed refresh gap, the exact SVD (GaLore's, and galore-torch's, numerics; qgalore's
# default is the warm-started randomized SVD). Rank, gap, scale, 8-bit moments and layer-wise
# updates: the recipe's.
GALORE = {"quantize_weights": False, "proj_quant": False, "adaptive": False, "svd_method": "full"}

def same_groups(user: Optimizer) -> list[dict[str, Any]]:
    """The module optimizer's groups (trainable parameters only; empty groups dropped), each with
    lr, betas, eps, weight_decay and `user_group` (its index there)."""
    groups = []
    for i, g in enumerate(user.param_groups):
        params = [p for p in g["params"] if p.requires_grad]
        if params:
            groups.append(dict(params=params, lr=float(g["lr"]), betas=tuple(g.get("betas", (0.9, 0.999))),
                               eps=g.get("eps", 1e-8), weight_decay=g.get("weight_decay", 0.0), user_group=i))
    return groups


class AdamW8bitCallback(OptimizerSwap):
    """The module's AdamW becomes bitsandbytes' `AdamW8bit` with the same groups and settings
    (blockwise 8-bit moments; tensors under `min_8bit_size` elements keep fp32 moments, as in
    `QGaLoreAdamW`). `paged=True` takes `PagedAdamW8bit` on CUDA (moments in unified memory, paged
    to the host under pressure); off CUDA paging does not exist and `AdamW8bit` is used."""

    def __init__(self, paged: bool = False, min_8bit_size: int = 4096) -> None:
        super().__init__()
        self.paged, self.min_8bit_size = paged, min_8bit_size

    def build_optimizer(self, pl_module: pl.LightningModule, user: Optimizer,
                        device: torch.device) -> Optimizer:
        import bitsandbytes as bnb

        cls = bnb.optim.PagedAdamW8bit if self.paged and device.type == "cuda" else bnb.optim.AdamW8bit
        return cls(same_groups(user), min_8bit_size=self.min_8bit_size)


class LoRACallback(Callback):
    """LoRA (`base="bf16"`, or "keep") or QLoRA's NF4 base (`base="nf4"`) on the module's linears
    matching `target_modules` and not `exclude`, at `setup` (before a checkpoint is restored); see
    `qgl.nn.apply_lora`. Every other parameter is frozen except those matching `trainable`.
    The module's optimizer is kept: it steps the adapters (frozen parameters get no gradient).

    With `base="nf4"` off CUDA, bitsandbytes' 4-bit layers must run on that device (bitsandbytes
    0.50 runs them on CPU); otherwise setup raises a ValueError saying that QLoRA needs CUDA.
    """

    def __init__(self, r: int = 16, alpha: float = 32.0, dropout: float = 0.0,
                 target_modules: Sequence[str] = ("attn", "mlp"), exclude: Sequence[str] = ("lm_head",),
                 trainable: Sequence[str] = (), base: str = "bf16") -> None:
        self.config = dict(r=r, alpha=alpha, dropout=dropout, target_modules=tuple(target_modules),
                           exclude=tuple(exclude), trainable=tuple(trainable), base=base)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str = "fit") -> None:
        device = trainer.strategy.root_device
        if self.config["base"] == "nf4":
            check_4bit(device)
        self._apply(pl_module, device)
        if is_overridden("configure_model", pl_module):  # layers built there (after setup) too
            wrap(pl_module, "configure_model", lambda user: (user(), self._apply(pl_module, device)),
                 once=True)

    def _apply(self, pl_module: pl.LightningModule, device: torch.device) -> None:
        from qgl.nn import apply_lora

        apply_lora(pl_module, **self.config, device=device)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        unwrap(pl_module, "configure_model")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        unwrap(pl_module, "configure_model")

    def state_dict(self) -> dict[str, Any]:
        # Saved so that `qgl export` can merge the adapters of a checkpoint (it needs alpha).
        return {"config": dict(self.config)}


def check_4bit(device: torch.device) -> None:
    """Raise a ValueError saying that QLoRA needs CUDA if bitsandbytes cannot quantize to NF4 on `device`."""
    if device.type == "cuda":
        return
    import bitsandbytes as bnb

    try:
        bnb.functional.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
    except Exception as err:
        raise ValueError(f"method qlora needs CUDA: bitsandbytes {bnb.__version__} cannot run its 4-bit "
                         f"(NF4) layers on {device.type} ({type(err).__name__}: {err}). Train on a GPU "
                         "(trainer.accelerator=gpu), or use method=lora (bf16 base) here") from err


def method_callbacks(method: str, qgalore: Mapping[str, Any] | None = None,
                     lora: Mapping[str, Any] | None = None, seed: int = 0) -> list[Callback]:
    """The callbacks of `method` (see the module's table). `qgalore`: `QGaLoreCallback` keyword
    arguments (the recipe's `qgalore` section) for galore/qgalore; `lora`: `LoRACallback`'s (its
    `lora` section) for lora/qlora; `seed`: stochastic rounding's."""
    method = ALIASES.get(method, method)
    q, lo = dict(qgalore or {}), dict(lora or {})
    if method == "full":
        return []
    if method == "adamw8bit":
        return [AdamW8bitCallback()]
    if method == "lora":
        return [LoRACallback(**lo, base="bf16")]
    if method == "qlora":
        return [LoRACallback(**lo, base="nf4"), AdamW8bitCallback(paged=True)]
    if method == "galore":
        return [QGaLoreCallback(**{**q, **GALORE, "seed": seed, "subspace_monitor": True})]
    if method == "qgalore":
        return [QGaLoreCallback(**{**q, "seed": seed, "subspace_monitor": True})]
    raise ValueError(f"unknown method {method!r}; known: {', '.join((*METHODS, *ALIASES))}")
