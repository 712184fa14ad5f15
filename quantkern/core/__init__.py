"""Pure-torch quantization math: schemes, qparams, the canonical quantized form."""

from .qparams import dequantize, fake_quantize, find_qparams, find_qparams_mse, quantize
from .qtensor import QuantizedWeight
from .scheme import SUPPORTED_BITS, WeightScheme, validate_bits, validate_group_size

__all__ = [
    "SUPPORTED_BITS", "WeightScheme", "QuantizedWeight", "validate_bits", "validate_group_size",
    "find_qparams", "find_qparams_mse", "quantize", "dequantize", "fake_quantize",
]
