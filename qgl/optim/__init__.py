"""Algorithm layer: projector, adaptive refresh, QGaLoreAdamW, layer-wise updates."""

from qgl.optim.param_groups import make_param_groups
from qgl.optim.projector import GaLoreProjector
from qgl.optim.qgalore_adamw import QGaLoreAdamW
from qgl.optim.refresh import AdaptiveRefresh

__all__ = ["AdaptiveRefresh", "GaLoreProjector", "QGaLoreAdamW", "make_param_groups"]
