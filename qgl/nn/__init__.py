"""qgl.nn: the INT8-weight linear layer, LoRA adapters, model surgery (no Lightning, no qgl.optim imports)."""

from .lora import LoRALinear, apply_lora, lora_modules
from .qlinear import QLinear
from .surgery import quantize_model, quantized_modules

__all__ = ["LoRALinear", "QLinear", "apply_lora", "lora_modules", "quantize_model", "quantized_modules"]
