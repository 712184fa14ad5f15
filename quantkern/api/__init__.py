"""Front doors: ``XQuantizer(model, ...).quantize(data)`` and ``prepare`` -> calibrate -> ``convert``."""

from .base import BaseQuantizer, convert, prepare, weight_bytes
from .config import BaseConfig, GPTQConfig, RTNConfig, WeightOnlyConfig
from .quantizers import GPTQQuantizer, RTNQuantizer
from .registry import quantizer_for, register_quantizer, registered_configs
from .configs_more import AWQConfig
from .awq import AWQQuantizer

__all__ = [
    "BaseConfig", "WeightOnlyConfig", "RTNConfig", "GPTQConfig", "BaseQuantizer", "RTNQuantizer", "GPTQQuantizer",
    "prepare", "convert", "register_quantizer", "quantizer_for", "registered_configs", "weight_bytes",
    "AWQConfig", "AWQQuantizer",
]
