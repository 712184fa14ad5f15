"""Front doors: ``XQuantizer(model, ...).quantize(data)`` and ``prepare`` -> calibrate -> ``convert``."""

from .base import BaseQuantizer, convert, prepare, weight_bytes
from .config import BaseConfig, GPTQConfig, RTNConfig, WeightOnlyConfig
from .quantizers import GPTQQuantizer, RTNQuantizer
from .registry import quantizer_for, register_quantizer, registered_configs
from .configs import (AWQConfig, FP4Config, FP8Config, PTQConfig, SmoothQuantConfig, W8A8Config,
                      ZeroQuantConfig)
from .awq import AWQQuantizer
from .smoothquant import FP8Quantizer, SmoothQuantQuantizer, W8A8Quantizer
from .ptq import PTQQuantizer
from .zeroquant import ZeroQuantQuantizer
from .fp4 import FP4Quantizer
from .budget import BudgetPlan, BudgetPlanner, Sensitivity

__all__ = [
    "BaseConfig", "WeightOnlyConfig", "RTNConfig", "GPTQConfig", "BaseQuantizer", "RTNQuantizer", "GPTQQuantizer",
    "prepare", "convert", "register_quantizer", "quantizer_for", "registered_configs", "weight_bytes",
    "AWQConfig", "AWQQuantizer", "W8A8Config", "W8A8Quantizer", "SmoothQuantConfig", "SmoothQuantQuantizer",
    "FP8Config", "FP8Quantizer", "PTQConfig", "PTQQuantizer", "ZeroQuantConfig",
    "ZeroQuantQuantizer", "FP4Config", "FP4Quantizer", "BudgetPlanner", "BudgetPlan", "Sensitivity",
]
