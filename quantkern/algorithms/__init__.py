"""Quantization algorithms: each small and model-agnostic, returning the canonical QuantizedWeight."""

from .gptq import GPTQ
from .rtn import group_index, quantize_rtn

__all__ = ["GPTQ", "quantize_rtn", "group_index"]
