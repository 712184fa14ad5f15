"""Quantization configs: frozen dataclasses, validated on construction, dispatched by type.

``BaseConfig.from_dict`` rejects unknown keys. Each config class is paired with one quantizer class
through :func:`quantkern.api.registry.register_quantizer`. Here: the base config and the integer
weight-only configs (RTN, GPTQ); the other families' configs are in :mod:`quantkern.api.configs`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import WeightScheme, validate_bits, validate_group_size
from ..core.spec import Spec
from ..kernels import Backend
from .targets import matches

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def validate_damp_percent(v) -> None:
    """GPTQ's initial Hessian damping: a number in (0, 1)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
        raise ValueError(f"damp_percent must be in (0, 1), got {v!r}")


def validate_patterns(name: str, v) -> tuple[str, ...]:
    """A module-name pattern or a list / tuple / set of them -> a tuple of non-empty strings; anything
    else is a ``ValueError`` saying what is allowed."""
    if isinstance(v, str):
        v = (v,)
    elif isinstance(v, (set, frozenset)):
        v = tuple(sorted(v, key=str))
    elif isinstance(v, (list, tuple)):
        v = tuple(v)
    else:
        raise ValueError(f"{name} must be a module-name pattern or a list of them (strings such as "
                         f"['lm_head', '*.mlp.*']), got {v!r} ({type(v).__name__})")
    for p in v:
        if not isinstance(p, str) or not p:
            raise ValueError(f"{name} must be non-empty strings (module-name patterns), got {p!r} in {list(v)!r}")
    return v


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


@dataclass(frozen=True)
class BaseConfig:
    """Common settings. ``skip_layers``: fnmatch patterns (or dotted suffixes) of module names left in
    full precision. ``device``: where calibration runs (default: where the model is)."""

    method: ClassVar[str] = "base"
    skip_layers: tuple[str, ...] = ("lm_head",)
    device: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "skip_layers", validate_patterns("skip_layers", self.skip_layers))

    def spec(self):
        """The :class:`~quantkern.core.spec.Spec` a layer quantized with these settings gets."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its layers as a Spec")

    def to_dict(self) -> dict:
        d = {"method": self.method}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "BaseConfig":
        d = dict(d)
        method = d.pop("method", cls.method)
        if method != cls.method:
            raise ValueError(f"{cls.__name__} got method={method!r}, expected {cls.method!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown keys for {cls.__name__}: {unknown}; allowed: {sorted(names)}")
        return cls(**d)


@dataclass(frozen=True)
class WeightOnlyConfig(BaseConfig, PerLayer):
    """Integer weight-only quantization to the GPTQ packed layout. ``overrides``: per-layer settings
    (:class:`PerLayer`), e.g. ``{"*.down_proj": {"bits": 8}, "*.self_attn.*": {"group_size": 64}}``."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    scale_dtype: str = "float16"
    backend: str = "auto"
    overrides: tuple = ()
    layer_keys: ClassVar[tuple[str, ...]] = ("bits", "group_size", "sym")

    def __post_init__(self):
        super().__post_init__()
        validate_bits(self.bits)
        validate_group_size(self.group_size)
        if not isinstance(self.sym, bool):
            raise ValueError(f"sym must be a bool, got {self.sym!r}")
        if self.scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype must be one of {sorted(_SCALE_DTYPES)}, got {self.scale_dtype!r}")
        Backend.parse(self.backend)
        self._normalize_overrides()

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        return _SCALE_DTYPES[self.scale_dtype]

    def scheme(self) -> WeightScheme:
        return WeightScheme(self.bits, self.group_size, self.sym, act_order=getattr(self, "actorder", False))

    def spec(self) -> Spec:
        """How a layer with these settings is quantized (per layer: ``for_layer(name).spec()``)."""
        return Spec(self.scheme())



@dataclass(frozen=True)
class RTNConfig(WeightOnlyConfig):
    """Round-to-nearest with min/max ranges (``mse=True``: search a clipping ratio per group)."""

    method: ClassVar[str] = "rtn"
    mse: bool = False
    layer_keys: ClassVar[tuple[str, ...]] = ("bits", "group_size", "sym", "mse")


@dataclass(frozen=True)
class ExpertCalibrationFields:
    """How MoE experts are calibrated (GPTQ, AWQ): ``expert_calibration="routed"`` (default) gives each
    expert the statistics of the tokens routed to it, ``"all"`` those of every token (the block's output
    still follows the real routing). An expert projection routed fewer (non-padding) tokens than
    ``min_expert_tokens`` (None: its in_features, below which a GPTQ Hessian is rank-deficient) gets
    ``expert_fallback``: ``"all_tokens"`` (default: calibrated on every token) or ``"rtn"``; RTN also
    where the whole calibration set is smaller than the threshold. ``report["expert_fallbacks"]`` names
    each such projection and why, ``report["expert_tokens"]`` gives every expert's routed token count."""

    min_expert_tokens: int | None = None
    expert_calibration: str = "routed"
    expert_fallback: str = "all_tokens"

    def expert_sources(self, name: str, label: str, in_features: int, tokens: list[int], total: int,
                       fallbacks: dict[str, str]) -> list[str]:
        """Where each expert's ``label`` projection (``in_features`` inputs) of experts module ``name``
        takes its statistics from: ``"routed"``, ``"all"`` (every token) or ``"rtn"`` (none), given the
        routed ``tokens`` per expert and the ``total`` calibration tokens. Each fallback is added to
        ``fallbacks`` (site name -> why) and logged."""
        import logging

        need = max(1, in_features if self.min_expert_tokens is None else self.min_expert_tokens)
        why = "in_features" if self.min_expert_tokens is None else "min_expert_tokens"
        every = self.expert_calibration == "all"
        out = []
        for e, got in enumerate(tokens):
            site = f"{name}.{e}.{label}"
            if (total if every else got) >= need:
                out.append("all" if every else "routed")
                continue
            if not every and self.expert_fallback == "all_tokens" and total >= need:
                out.append("all")
                fallbacks[site] = (f"all tokens: {got} calibration token(s) routed to expert {e}, fewer than {need} "
                                   f"({why}); calibrated on all {total} tokens")
            else:
                out.append("rtn")
                what = f"{total} calibration token(s) in all" if every else \
                    f"{got} calibration token(s) routed to expert {e}"
                fallbacks[site] = f"RTN: {what}, fewer than {need} ({why})"
            logging.getLogger("quantkern").warning("quantkern: %s: %s", site, fallbacks[site])
        return out

    def validate_expert_fields(self) -> None:
        v = self.min_expert_tokens
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"min_expert_tokens must be None (in_features) or an int >= 0, got {v!r}")
        if self.expert_calibration not in ("routed", "all"):
            raise ValueError(f"expert_calibration must be 'routed' or 'all', got {self.expert_calibration!r}")
        if self.expert_fallback not in ("all_tokens", "rtn"):
            raise ValueError(f"expert_fallback must be 'all_tokens' or 'rtn', got {self.expert_fallback!r}")


@dataclass(frozen=True)
class GPTQConfig(ExpertCalibrationFields, WeightOnlyConfig):
    """GPTQ. ``actorder``: visit columns by decreasing Hessian diagonal; ``static_groups``: fix group
    parameters before the error propagation (so groups follow the original column order);
    ``damp_percent``: initial Hessian damping (raised automatically if Cholesky fails);
    ``true_sequential``: within a block, quantize Linears stage by stage, each calibrated on the outputs
    of the stages already quantized; ``mse``: clipping search for each group's range;
    ``nsamples`` / ``seq_len``: size of the calibration set built from text (ignored for token data);
    ``batch_size``: calibration rows per forward. MoE experts: see :class:`ExpertCalibrationFields`."""

    method: ClassVar[str] = "gptq"
    actorder: bool = False
    damp_percent: float = 0.01
    blocksize: int = 128
    static_groups: bool = False
    true_sequential: bool = True
    mse: bool = False
    nsamples: int = 128
    seq_len: int = 512
    batch_size: int = 8
    layer_keys: ClassVar[tuple[str, ...]] = ("bits", "group_size", "sym", "actorder", "static_groups", "mse",
                                             "damp_percent")

    def __post_init__(self):
        super().__post_init__()
        validate_damp_percent(self.damp_percent)
        self.validate_expert_fields()
        for name in ("blocksize", "nsamples", "seq_len", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
