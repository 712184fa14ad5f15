"""Configs of int8 W8A8, plain and SmoothQuant (the quantizers: :mod:`quantkern.api.smoothquant`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core import WeightScheme
from ...core.spec import ActivationScheme, Spec
from ..config import BaseConfig
from .common import CalibrationFields, PerLayer, validate_bool, validate_calibration_fields


W8A8_BACKENDS = ("auto", "int_mm", "triton", "reference")


@dataclass(frozen=True)
class W8A8Config(BaseConfig, CalibrationFields, PerLayer):
    """W8A8 int8 without smoothing: int8 per-channel symmetric weights, int8 activations — dynamic per
    token (default, needs no data) or, with ``act_static=True``, one static per-tensor scale per Linear
    from the calibration abs-max. ``backend``: ``"auto"`` (``torch._int_mm`` where it applies),
    ``"int_mm"``, ``"triton"`` (the fused-epilogue kernel) or ``"reference"``; output modules are
    :class:`~quantkern.nn.w8a8_linear.W8A8Linear`."""

    method: ClassVar[str] = "w8a8"
    act_static: bool = False
    backend: str = "auto"

    overrides: tuple = ()
    layer_keys: ClassVar[tuple[str, ...]] = ("act_static",)

    def __post_init__(self):
        super().__post_init__()
        validate_bool("act_static", self.act_static)
        if self.backend not in W8A8_BACKENDS:
            raise ValueError(f"backend must be one of {list(W8A8_BACKENDS)}, got {self.backend!r}")
        validate_calibration_fields(self)

    def spec(self) -> Spec:
        smooth = ("smooth",) if self.method == "smoothquant" else ()
        return Spec(WeightScheme(8, -1, True), ActivationScheme("int", 8, static=self.act_static), smooth)



@dataclass(frozen=True)
class SmoothQuantConfig(W8A8Config):
    """SmoothQuant then W8A8: per-channel smoothing ``s = max|X|^alpha / max|W|^(1-alpha)`` folded into
    the norms before each group of Linears sharing an input (same per-architecture specs as AWQ).
    ``smooth_linear_producers``: also smooth Linears fed by another Linear (``up_proj -> down_proj``,
    and ``v_proj -> o_proj`` where shapes match), folding ``1/s`` into the producer's output rows."""

    method: ClassVar[str] = "smoothquant"
    alpha: float = 0.5
    smooth_linear_producers: bool = False

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be a number in [0, 1], got {self.alpha!r}")
        validate_bool("smooth_linear_producers", self.smooth_linear_producers)
