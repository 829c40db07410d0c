"""Algorithm layer: projector, adaptive refresh, QGaLoreAdamW, layer-wise updates.

The names below import on first use: `qgl.optim.settings` (torch-free) is read by the recipe loader,
and `qgl --help` / `qgl recipes` must not load torch through this package (tests/test_packaging.py).
"""

from importlib import import_module
from typing import Any

_LAZY = {
    "AdaptiveRefresh": "qgl.optim.refresh",
    "GaLoreProjector": "qgl.optim.projector",
    "QGaLoreAdamW": "qgl.optim.qgalore_adamw",
    "make_param_groups": "qgl.optim.param_groups",
}

__all__ = ["AdaptiveRefresh", "GaLoreProjector", "QGaLoreAdamW", "make_param_groups"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qgl.optim' has no attribute {name!r}")
