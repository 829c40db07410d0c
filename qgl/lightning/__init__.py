"""Lightning layer: the LightningModule(s) of qgl (the callbacks live in `qgl.callbacks`)."""

from qgl.lightning.module import CausalLMModule, WarmupCosine

__all__ = ["CausalLMModule", "WarmupCosine"]
