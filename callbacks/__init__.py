"""Lightning callbacks of qgl (import name `qgl.callbacks`): Q-GaLore on any LightningModule, the other
training methods (`methods.py`), and monitors."""

from qgl.callbacks.memory import MemoryMonitor
from qgl.callbacks.methods import AdamW8bitCallback, LoRACallback, method_callbacks
from qgl.callbacks.qgalore import QGaLoreCallback
from qgl.callbacks.subspace import SubspaceMonitor
from qgl.callbacks.swap import OptimizerSwap

__all__ = ["AdamW8bitCallback", "LoRACallback", "MemoryMonitor", "OptimizerSwap", "QGaLoreCallback",
           "SubspaceMonitor", "method_callbacks"]
