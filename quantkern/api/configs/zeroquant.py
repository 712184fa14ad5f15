"""ZeroQuant's config (the quantizer: :mod:`quantkern.api.zeroquant`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core import WeightScheme
from ...core.spec import ActivationScheme, Spec
from ..config import BaseConfig
from .common import CalibrationFields, PerLayer, validate_bool, validate_calibration_fields


@dataclass(frozen=True)
class ZeroQuantConfig(BaseConfig, CalibrationFields, PerLayer):
    """ZeroQuant-style: group-wise integer weights (``w_bits``, ``w_group_size``; ``-1`` = per channel)
    and token-wise dynamic integer activations (``a_bits``), or one static per-tensor range per Linear
    with ``act_static=True`` (min-max observed on calibration data). ``*_has_zero``: asymmetric with
    an integer zero point; ``*_unsign``: unsigned code range ``[0, 2^b-1]`` (without a zero point only
    non-negative values are representable). Output modules: :class:`~quantkern.nn.w8a8_linear.ZeroQuantLinear`."""

    method: ClassVar[str] = "zeroquant"
    w_bits: int = 8
    w_group_size: int = 64
    w_has_zero: bool = False
    w_unsign: bool = False
    a_bits: int = 8
    a_has_zero: bool = False
    a_unsign: bool = False
    act_static: bool = False

    overrides: tuple = ()
    layer_keys: ClassVar[tuple[str, ...]] = ("w_bits", "w_group_size", "w_has_zero", "w_unsign", "a_bits",
                                             "a_has_zero", "a_unsign", "act_static")

    def __post_init__(self):
        super().__post_init__()
        for name in ("w_bits", "a_bits"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not 2 <= v <= 8:
                raise ValueError(f"{name} must be an int in 2..8, got {v!r}")
        g = self.w_group_size
        if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
            raise ValueError(f"w_group_size must be -1 or a positive int, got {g!r}")
        for name in ("w_has_zero", "w_unsign", "a_has_zero", "a_unsign", "act_static"):
            validate_bool(name, getattr(self, name))
        if self.w_unsign and not self.w_has_zero:
            raise ValueError("w_unsign=True needs w_has_zero=True: weights have both signs, and an unsigned range "
                             "without a zero point cannot hold negative values")
        validate_calibration_fields(self)

    def scheme_kwargs(self) -> dict:
        return dict(w_bits=self.w_bits, group_size=self.w_group_size, w_has_zero=self.w_has_zero,
                    w_unsign=self.w_unsign, a_bits=self.a_bits, a_has_zero=self.a_has_zero, a_unsign=self.a_unsign)

    def spec(self) -> Spec:
        act = ActivationScheme("int", self.a_bits, static=self.act_static, has_zero=self.a_has_zero,
                               unsign=self.a_unsign)
        return Spec(WeightScheme(self.w_bits, self.w_group_size, not self.w_has_zero), act)

