"""FP8 E4M3's config (the quantizer: :class:`quantkern.api.smoothquant.FP8Quantizer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.spec import ActivationScheme, FloatWeightScheme, Spec
from ..config import BaseConfig, validate_damp_percent
from .common import CalibrationFields, PerLayer, validate_bool, validate_calibration_fields


_FP8_PAIRS = (("float8_e4m3fn", None), ("float8_e4m3fn", "float8_e4m3fn"))


@dataclass(frozen=True)
class FP8Config(BaseConfig, CalibrationFields, PerLayer):
    """FP8 E4M3 with per-output-channel weight scales. ``act_dtype=None``: weight-only (W8A16 fp8);
    ``"float8_e4m3fn"``: W8A8 fp8 with per-token dynamic activation scales, or one static per-tensor
    scale per Linear with ``act_static=True`` (then calibration data is needed). ``backend``:
    ``"auto"`` (``torch._scaled_mm`` on sm89+ GPUs, emulation elsewhere), ``"scaled_mm"`` (fail if
    unavailable) or ``"emulated"``. Output modules are :class:`~quantkern.nn.fp8_linear.FP8Linear`.

    ``weight_method``: ``"rtn"`` (round each weight to the nearest fp8 value; no data) or ``"gptq"``
    (GPTQ's error feedback on the fp8 grid, block by block on calibration data, with ``damp_percent``
    and ``actorder`` as in :class:`~quantkern.api.config.GPTQConfig`; the stored format is the same,
    so it costs nothing at inference). With ``"gptq"`` and ``act_static``, the static activation
    scales come from the same pass (the inputs each Linear sees once the blocks before it are
    quantized)."""

    method: ClassVar[str] = "fp8"
    weight_dtype: str = "float8_e4m3fn"
    act_dtype: str | None = "float8_e4m3fn"
    act_static: bool = False
    backend: str = "auto"
    weight_method: str = "rtn"
    damp_percent: float = 0.01
    actorder: bool = False

    overrides: tuple = ()
    layer_keys: ClassVar[tuple[str, ...]] = ("act_dtype", "act_static")

    def __post_init__(self):
        super().__post_init__()
        if (self.weight_dtype, self.act_dtype) not in _FP8_PAIRS:
            hint = " (int8 activations: use W8A8Config / SmoothQuantConfig)" if self.act_dtype == "int8" else ""
            raise ValueError(f"unsupported (weight_dtype, act_dtype) pair ({self.weight_dtype!r}, {self.act_dtype!r})"
                             f"{hint}; supported: {list(_FP8_PAIRS)}")
        validate_bool("act_static", self.act_static)
        if self.act_static and self.act_dtype is None:
            raise ValueError("act_static=True needs quantized activations (act_dtype='float8_e4m3fn')")
        if self.backend not in ("auto", "scaled_mm", "emulated"):
            raise ValueError(f"backend must be one of ['auto', 'scaled_mm', 'emulated'], got {self.backend!r}")
        if self.weight_method not in ("rtn", "gptq"):
            raise ValueError(f"weight_method must be 'rtn' or 'gptq', got {self.weight_method!r}")
        validate_damp_percent(self.damp_percent)
        validate_bool("actorder", self.actorder)
        validate_calibration_fields(self)

    @property
    def act_mode(self) -> str:
        return "none" if self.act_dtype is None else ("static" if self.act_static else "dynamic")

    def spec(self) -> Spec:
        act = None if self.act_dtype is None else ActivationScheme("fp8_e4m3", 8, static=self.act_static)
        return Spec(FloatWeightScheme("fp8_e4m3"), act)

