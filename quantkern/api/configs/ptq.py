"""Static PTQ's config (the quantizer: :mod:`quantkern.api.ptq`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core import WeightScheme
from ...core.spec import ActivationScheme, FloatWeightScheme, Spec
from ..config import BaseConfig
from .common import CalibrationFields, PerLayer, validate_calibration_fields
from .w8a8 import W8A8_BACKENDS


_PTQ_PAIRS = (("int8", "int8"), ("float8_e4m3fn", "float8_e4m3fn"))


@dataclass(frozen=True)
class PTQConfig(BaseConfig, CalibrationFields, PerLayer):
    """Static post-training quantization: ``prepare`` puts an observer on the input of every target
    Linear, calibration forwards fill them, ``convert`` freezes one static per-tensor activation scale
    per Linear. Weights per-channel (int8 -> :class:`~quantkern.nn.W8A8Linear`, fp8 E4M3 ->
    :class:`~quantkern.nn.fp8_linear.FP8Linear`). ``observer``: ``"minmax"``, ``"moving_average"``
    (``averaging_constant``), ``"percentile"`` (``percentile`` of |x|) or ``"mse"``."""

    method: ClassVar[str] = "ptq"
    weight_dtype: str = "int8"
    act_dtype: str = "int8"
    observer: str = "minmax"
    percentile: float = 99.99
    averaging_constant: float = 0.01
    backend: str = "auto"

    overrides: tuple = ()
    layer_keys: ClassVar[tuple[str, ...]] = ("observer", "percentile", "averaging_constant")

    def __post_init__(self):
        from ...algorithms.observers import OBSERVERS

        super().__post_init__()
        if (self.weight_dtype, self.act_dtype) not in _PTQ_PAIRS:
            raise ValueError(f"unsupported (weight_dtype, act_dtype) pair ({self.weight_dtype!r}, {self.act_dtype!r}); "
                             f"supported: {list(_PTQ_PAIRS)}")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer must be one of {list(OBSERVERS)}, got {self.observer!r}")
        if not (isinstance(self.percentile, (int, float)) and 0 < self.percentile <= 100):
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if not (isinstance(self.averaging_constant, (int, float)) and 0 < self.averaging_constant <= 1):
            raise ValueError(f"averaging_constant must be in (0, 1], got {self.averaging_constant!r}")
        allowed = W8A8_BACKENDS if self.weight_dtype == "int8" else ("auto", "scaled_mm", "emulated")
        if self.backend not in allowed:
            raise ValueError(f"backend for {self.weight_dtype} must be one of {list(allowed)}, got {self.backend!r}")
        validate_calibration_fields(self)

    @property
    def act_static(self) -> bool:
        return True

    def spec(self) -> Spec:
        if self.weight_dtype == "int8":
            return Spec(WeightScheme(8, -1, True), ActivationScheme("int", 8, static=True))
        return Spec(FloatWeightScheme("fp8_e4m3"), ActivationScheme("fp8_e4m3", 8, static=True))

