"""Lightning callbacks of qgl (import name `qgl.callbacks`): Q-GaLore on any LightningModule, and monitors."""

from qgl.callbacks.memory import MemoryMonitor
from qgl.callbacks.qgalore import QGaLoreCallback
from qgl.callbacks.subspace import SubspaceMonitor

__all__ = ["MemoryMonitor", "QGaLoreCallback", "SubspaceMonitor"]
