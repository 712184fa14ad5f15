"""Quantized modules."""

from .base import build_kernels
from .quant_linear import QuantLinear, release_canonical

__all__ = ["QuantLinear", "build_kernels", "release_canonical"]
