"""quantkern: quantize Hugging Face causal LMs to packed low-bit weights and run them fast."""

__version__ = "0.1.0"

from .core import QuantizedWeight, WeightScheme
from .kernels import Backend
from .nn import QuantLinear

__all__ = ["__version__", "QuantizedWeight", "WeightScheme", "Backend", "QuantLinear"]
