"""FP4 E2M1's config (the quantizer: :mod:`quantkern.api.fp4`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.spec import FloatWeightScheme, Spec
from ..config import BaseConfig
from .common import PerLayer, validate_bool


@dataclass(frozen=True)
class FP4Config(BaseConfig, PerLayer):
    """FP4 (E2M1) weight-only with one scale per (row, group of ``group_size`` input channels);
    ``scale_dtype`` in float16 / bfloat16 / float32 / float8_e4m3fn; ``mse``: clipping search per
    group. Data-free. Output modules: :class:`~quantkern.nn.fp4_linear.FP4Linear`."""

    method: ClassVar[str] = "fp4"
    group_size: int = 32
    scale_dtype: str = "float16"
    mse: bool = False

    overrides: tuple = ()
    layer_keys: ClassVar[tuple[str, ...]] = ("group_size", "scale_dtype", "mse")

    def __post_init__(self):
        from ...nn.fp4_linear import SCALE_DTYPES

        super().__post_init__()
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
            raise ValueError(f"group_size must be -1 or a positive int, got {g!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        validate_bool("mse", self.mse)
        self._normalize_overrides()

    def spec(self) -> Spec:
        return Spec(FloatWeightScheme("fp4_e2m1", self.group_size))

