"""Configs of the calibrated algorithms beyond GPTQ: AWQ, SmoothQuant / W8A8, FP8, PTQ observers.

Common settings (names as users know them from other tools): ``overrides`` (per-layer settings, see
:class:`PerLayer`), ``skip_layers`` (fnmatch patterns or
dotted suffixes), ``device`` (where calibration runs), ``num_calibrate`` (use at most this many
calibration samples), ``calibrate_seq_length`` (truncate each sample to this many tokens),
``batch_size`` (rows per calibration forward), ``offload`` (keep captured block inputs on the CPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .config import BaseConfig, WeightOnlyConfig, validate_damp_percent
from .targets import matches


def _positive_int(name: str, v, allow_none: bool = False) -> None:
    if allow_none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}")


def _bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be a bool, got {v!r}")


@dataclass(frozen=True)
class CalibrationFields:
    """Calibration settings every calibrated config shares: ``num_calibrate`` (samples used),
    ``calibrate_seq_length`` (tokens per sample), ``batch_size`` (rows per forward), ``offload``."""

    num_calibrate: int | None = None
    calibrate_seq_length: int | None = None
    batch_size: int = 8
    offload: bool = False


class PerLayer:
    """Per-layer overrides: ``overrides={"*.down_proj": {"bits": 8}, ...}`` (fnmatch patterns or dotted
    suffixes, as ``skip_layers``; the first matching pattern wins). Only the keys in ``layer_keys`` may
    be overridden; each override is validated on construction by building the layer's config."""

    layer_keys: ClassVar[tuple[str, ...]] = ()

    def _normalize_overrides(self) -> None:
        raw = self.overrides
        if raw is not None and not isinstance(raw, (dict, list, tuple)):
            raise ValueError("overrides must be a dict {module-name pattern: {setting: value}} (or a list of "
                             f"(pattern, settings) pairs), got {raw!r} ({type(raw).__name__})")
        items = list(raw.items()) if isinstance(raw, dict) else list(raw or ())
        norm = []
        for entry in items:
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) and entry[0]):
                raise ValueError(f"overrides must map module-name patterns to settings dicts, got {entry!r}")
            pattern, settings = entry
            try:
                settings = dict(settings)
            except (TypeError, ValueError):
                raise ValueError(f"overrides[{pattern!r}] must be a dict of settings (allowed keys: "
                                 f"{list(self.layer_keys)}), got {settings!r}") from None
            bad = sorted(set(settings) - set(self.layer_keys))
            if bad:
                raise ValueError(f"{type(self).__name__} cannot override {bad} per layer; allowed: "
                                 f"{list(self.layer_keys)}")
            norm.append((pattern, tuple(sorted(settings.items()))))
        object.__setattr__(self, "overrides", tuple(norm))
        for pattern, _ in norm:  # build each layer config once so bad values fail now
            self._layer_config(pattern)

    def _layer_config(self, pattern: str):
        settings = dict(dict(self.overrides)[pattern])
        return dataclasses.replace(self, overrides=(), **self._fix_override(settings))

    def _fix_override(self, settings: dict) -> dict:
        return settings

    def for_layer(self, name: str):
        """This config with the first override whose pattern matches module ``name`` applied."""
        for pattern, _ in self.overrides:
            if matches(name, [pattern]):
                return self._layer_config(pattern)
        return self

    def any_layer(self, key: str) -> bool:
        """True if ``key`` is truthy in this config or in any override."""
        return bool(getattr(self, key)) or any(bool(dict(st).get(key)) for _, st in self.overrides)


def validate_calibration_fields(c) -> None:
    _positive_int("num_calibrate", c.num_calibrate, allow_none=True)
    _positive_int("calibrate_seq_length", c.calibrate_seq_length, allow_none=True)
    _positive_int("batch_size", c.batch_size)
    _bool("offload", c.offload)
    c._normalize_overrides()


@dataclass(frozen=True)
class AWQConfig(WeightOnlyConfig, CalibrationFields, PerLayer):
    """AWQ: activation-aware scale search per group of Linears sharing an input, folded into the
    preceding norm / Linear, then a weight-clipping search, then RTN into the GPTQ packed layout.

    ``zero_point=True`` (default) is asymmetric quantization (``sym=False``); ``sym`` may be given
    instead but must agree. ``duo_scaling``: scales from activation *and* weight magnitudes (AutoAWQ's
    default) rather than activations alone (the paper). ``n_grid``: α grid points in [0, 1);
    ``clip``: run the clipping search, shrinking ``max|w|`` by at most ``max_shrink``;
    ``max_search_tokens`` / ``clip_tokens``: token subsample sizes for the two searches (fixed seed);
    ``propagate_quantized``: calibrate each block on the quantized previous blocks' outputs (one more
    forward per block) instead of the float ones (AutoAWQ's choice, the default)."""

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
        _bool("zero_point", self.zero_point)
        if self.sym is None:
            object.__setattr__(self, "sym", not self.zero_point)
        elif isinstance(self.sym, bool) and self.sym == self.zero_point:
            raise ValueError(f"sym={self.sym} contradicts zero_point={self.zero_point} (sym means no zero point)")
        super().__post_init__()
        for name in ("duo_scaling", "clip", "propagate_quantized"):
            _bool(name, getattr(self, name))
        for name in ("n_grid", "max_search_tokens", "clip_tokens"):
            _positive_int(name, getattr(self, name))
        if not (isinstance(self.max_shrink, (int, float)) and 0 <= self.max_shrink < 1):
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink!r}")
        validate_calibration_fields(self)

    def _fix_override(self, settings: dict) -> dict:
        if "zero_point" in settings:  # sym follows zero_point in a layer's config
            settings["sym"] = not settings["zero_point"]
        return settings


_W8A8_BACKENDS = ("auto", "int_mm", "triton", "reference")


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
        _bool("act_static", self.act_static)
        if self.backend not in _W8A8_BACKENDS:
            raise ValueError(f"backend must be one of {list(_W8A8_BACKENDS)}, got {self.backend!r}")
        validate_calibration_fields(self)


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
        _bool("smooth_linear_producers", self.smooth_linear_producers)


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
        _bool("act_static", self.act_static)
        if self.act_static and self.act_dtype is None:
            raise ValueError("act_static=True needs quantized activations (act_dtype='float8_e4m3fn')")
        if self.backend not in ("auto", "scaled_mm", "emulated"):
            raise ValueError(f"backend must be one of ['auto', 'scaled_mm', 'emulated'], got {self.backend!r}")
        if self.weight_method not in ("rtn", "gptq"):
            raise ValueError(f"weight_method must be 'rtn' or 'gptq', got {self.weight_method!r}")
        validate_damp_percent(self.damp_percent)
        _bool("actorder", self.actorder)
        validate_calibration_fields(self)

    @property
    def act_mode(self) -> str:
        return "none" if self.act_dtype is None else ("static" if self.act_static else "dynamic")


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
        from ..algorithms.observers import OBSERVERS

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
        allowed = _W8A8_BACKENDS if self.weight_dtype == "int8" else ("auto", "scaled_mm", "emulated")
        if self.backend not in allowed:
            raise ValueError(f"backend for {self.weight_dtype} must be one of {list(allowed)}, got {self.backend!r}")
        validate_calibration_fields(self)

    @property
    def act_static(self) -> bool:
        return True


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
            _bool(name, getattr(self, name))
        if self.w_unsign and not self.w_has_zero:
            raise ValueError("w_unsign=True needs w_has_zero=True: weights have both signs, and an unsigned range "
                             "without a zero point cannot hold negative values")
        validate_calibration_fields(self)

    def scheme_kwargs(self) -> dict:
        return dict(w_bits=self.w_bits, group_size=self.w_group_size, w_has_zero=self.w_has_zero,
                    w_unsign=self.w_unsign, a_bits=self.a_bits, a_has_zero=self.a_has_zero, a_unsign=self.a_unsign)


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
        from ..nn.fp4_linear import SCALE_DTYPES

        super().__post_init__()
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or not (g == -1 or g > 0):
            raise ValueError(f"group_size must be -1 or a positive int, got {g!r}")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(SCALE_DTYPES)}, got {self.scale_dtype!r}")
        _bool("mse", self.mse)
        self._normalize_overrides()
