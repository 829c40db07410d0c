"""qgl.nn: the INT8-weight linear layer and model surgery (no Lightning, no qgl.optim imports)."""

from .qlinear import QLinear
from .surgery import quantize_model, quantized_modules

__all__ = ["QLinear", "quantize_model", "quantized_modules"]
