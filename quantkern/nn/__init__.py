"""Quantized modules."""

from .quant_linear import QuantLinear

__all__ = ["QuantLinear"]
