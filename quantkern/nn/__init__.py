"""Quantized modules."""

from .quant_linear import QuantLinear, release_canonical

__all__ = ["QuantLinear", "release_canonical"]
