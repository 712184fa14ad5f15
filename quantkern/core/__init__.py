"""Pure-torch quantization math: schemes, qparams, the canonical quantized form."""

from .qparams import (ScaleOverflowError, dequantize, dtype_overflow, fake_quantize, find_qparams, find_qparams_mse,
                      naming_layer, quantize)
from .qtensor import QuantizedWeight
from .scheme import SUPPORTED_BITS, WeightScheme, validate_bits, validate_group_size

__all__ = [
    "SUPPORTED_BITS", "WeightScheme", "QuantizedWeight", "validate_bits", "validate_group_size",
    "find_qparams", "find_qparams_mse", "ScaleOverflowError", "dtype_overflow",
    "naming_layer", "quantize", "dequantize", "fake_quantize",
]
