"""AWQ's config (the quantizer: :mod:`quantkern.api.awq`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...core.spec import Spec
from ..config import ExpertCalibrationFields, WeightOnlyConfig
from .common import CalibrationFields, PerLayer, validate_bool, validate_calibration_fields, validate_positive_int


@dataclass(frozen=True)
class AWQConfig(ExpertCalibrationFields, WeightOnlyConfig, CalibrationFields, PerLayer):
    """AWQ: activation-aware scale search per group of Linears sharing an input, folded into the
    preceding norm / Linear, then a weight-clipping search, then RTN into the GPTQ packed layout.

    ``zero_point=True`` (default) is asymmetric quantization (``sym=False``); ``sym`` may be given
    instead but must agree. ``duo_scaling``: scales from activation *and* weight magnitudes (AutoAWQ's
    default) rather than activations alone (the paper). ``n_grid``: α grid points in [0, 1);
    ``clip``: run the clipping search, shrinking ``max|w|`` by at most ``max_shrink``;
    ``max_search_tokens`` / ``clip_tokens``: token subsample sizes for the two searches (fixed seed);
    ``propagate_quantized``: calibrate each block on the quantized previous blocks' outputs (one more
    forward per block) instead of the float ones (AutoAWQ's choice, the default). MoE experts: see
    :class:`~quantkern.api.config.ExpertCalibrationFields` and :mod:`quantkern.api.awq_experts`."""

    method: ClassVar[str] = "awq"
    sym: bool | None = None
    zero_point: bool = True
    duo_scaling: bool = True
    n_grid: int = 20
    clip: bool = True
    max_shrink: float = 0.5
    max_search_tokens: int = 4096
    clip_tokens: int = 512
    propagate_quantized: bool = False

    overrides: tuple = ()
    layer_keys: ClassVar[tuple[str, ...]] = ("bits", "group_size", "zero_point")

    def __post_init__(self):
        validate_bool("zero_point", self.zero_point)
        if self.sym is None:
            object.__setattr__(self, "sym", not self.zero_point)
        elif isinstance(self.sym, bool) and self.sym == self.zero_point:
            raise ValueError(f"sym={self.sym} contradicts zero_point={self.zero_point} (sym means no zero point)")
        super().__post_init__()
        for name in ("duo_scaling", "clip", "propagate_quantized"):
            validate_bool(name, getattr(self, name))
        for name in ("n_grid", "max_search_tokens", "clip_tokens"):
            validate_positive_int(name, getattr(self, name))
        if not (isinstance(self.max_shrink, (int, float)) and 0 <= self.max_shrink < 1):
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink!r}")
        validate_calibration_fields(self)
        self.validate_expert_fields()

    def _fix_override(self, settings: dict) -> dict:
        if "zero_point" in settings:  # sym follows zero_point in a layer's config
            settings["sym"] = not settings["zero_point"]
        return settings

    def spec(self) -> Spec:
        return Spec(self.scheme(), transforms=("smooth",))

