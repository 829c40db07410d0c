"""qgl.nn: the INT8-weight linear layer, LoRA adapters, model surgery (no Lightning, no qgl.optim imports)."""

from .lora import LoRALinear, apply_lora, lora_modules
from .qlinear import QLinear
from .restore import dequantize_model, guard_hf_saves, plain_state_dict, plain_weight
from .surgery import check_rank, is_conv1d, quantize_model, quantized_modules

__all__ = ["LoRALinear", "QLinear", "apply_lora", "check_rank", "dequantize_model", "guard_hf_saves",
           "is_conv1d", "lora_modules", "plain_state_dict", "plain_weight", "quantize_model",
           "quantized_modules"]
