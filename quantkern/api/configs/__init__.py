"""Configs of the calibrated algorithms beyond GPTQ, one module per family: AWQ (:mod:`.awq`), W8A8 and
SmoothQuant (:mod:`.w8a8`), FP8 (:mod:`.fp8`), static PTQ (:mod:`.ptq`), ZeroQuant (:mod:`.zeroquant`),
FP4 (:mod:`.fp4`); what they share (calibration fields, per-layer overrides) is in :mod:`.common`.
The base config and the integer weight-only configs (RTN, GPTQ) live in :mod:`quantkern.api.config`.
"""

from .awq import AWQConfig
from .common import CalibrationFields, PerLayer
from .fp4 import FP4Config
from .fp8 import FP8Config
from .ptq import PTQConfig
from .w8a8 import SmoothQuantConfig, W8A8Config
from .zeroquant import ZeroQuantConfig

__all__ = [
    "AWQConfig", "W8A8Config", "SmoothQuantConfig", "FP8Config", "PTQConfig", "ZeroQuantConfig", "FP4Config",
    "CalibrationFields", "PerLayer",
]
