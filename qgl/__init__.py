"""qgl: train and fine-tune LLMs in a fraction of the GPU memory with Q-GaLore, as Lightning parts.

The public API is this list; everything else is an implementation detail.

Core (plain PyTorch, no Lightning needed):
    QGaLoreAdamW       the optimizer: GaLore projection, INT4 projections, 8-bit moments,
                       INT8 weights with stochastic rounding, layer-wise updates
    make_param_groups  split a model into GaLore and plain AdamW groups by module name
    QLinear            nn.Linear with INT8 group-quantized weight storage
    quantize_model     swap chosen nn.Linear modules for QLinear, in place
    dequantize_model   undo it (and LoRA): QLinear / LoRALinear back to nn.Linear, in place
    export             write a model or a `qgl train` checkpoint as a Hugging Face directory
                       (safetensors; qgl.hf_export)

Lightning:
    QGaLoreCallback, SubspaceMonitor, MemoryMonitor   callbacks (qgl.callbacks)
    CausalLMModule                                    LightningModule for causal LMs
    NonFiniteGuard                                    stop at the first NaN/inf, never checkpoint one

Every name is imported on first use, so that `import qgl` (and the `qgl` command's `--help` and
`recipes`) loads no torch.
"""

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "QGaLoreAdamW": "qgl.optim",
    "make_param_groups": "qgl.optim",
    "QLinear": "qgl.nn",
    "quantize_model": "qgl.nn",
    "dequantize_model": "qgl.nn",
    "QGaLoreCallback": "qgl.callbacks",
    "SubspaceMonitor": "qgl.callbacks",
    "MemoryMonitor": "qgl.callbacks",
    "NonFiniteGuard": "qgl.callbacks",
    "CausalLMModule": "qgl.lightning",
    "export": "qgl.hf_export",
}

__all__ = [*_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qgl' has no attribute {name!r}")
