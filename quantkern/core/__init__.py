"""Pure-torch quantization math: schemes, qparams, the canonical quantized form, and the codecs in their own
modules: :mod:`.int8` (int8 W8A8, ZeroQuant integer ranges), :mod:`.fp8` (E4M3), :mod:`.fp4` (E2M1 + nibble packing).

Nothing here imports from the rest of quantkern."""

from .qparams import (ScaleOverflowError, dequantize, dtype_overflow, fake_quantize, find_qparams, find_qparams_mse,
                      naming_layer, quantize)
from .qtensor import QuantizedWeight
from .scheme import SUPPORTED_BITS, WeightScheme, validate_bits, validate_group_size

__all__ = [
    "SUPPORTED_BITS", "WeightScheme", "QuantizedWeight", "validate_bits", "validate_group_size",
    "find_qparams", "find_qparams_mse", "ScaleOverflowError", "dtype_overflow",
    "naming_layer", "quantize", "dequantize", "fake_quantize",
]
