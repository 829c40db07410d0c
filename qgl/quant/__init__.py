"""qgl.quant: the storage formats (INT8 weights, packed INT4 projections, 8-bit optimizer blocks).

Containers and helpers over ``qgl.kernels``; see docs/internals.md for the exact formats.
"""

from .blockwise8 import dequantize_blockwise, dynamic_map, quantize_blockwise
from .int4 import Int4Tensor
from .int8 import Int8Tensor, attach_storage, storage_of

__all__ = [
    "Int8Tensor",
    "attach_storage",
    "storage_of",
    "Int4Tensor",
    "dynamic_map",
    "quantize_blockwise",
    "dequantize_blockwise",
]
