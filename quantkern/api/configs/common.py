"""What the configs of the calibrated algorithms beyond GPTQ share: calibration fields, per-layer overrides,
value checks.

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

from ..targets import matches


def validate_positive_int(name: str, v, allow_none: bool = False) -> None:
    if allow_none and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}")


def validate_bool(name: str, v) -> None:
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
    validate_positive_int("num_calibrate", c.num_calibrate, allow_none=True)
    validate_positive_int("calibrate_seq_length", c.calibrate_seq_length, allow_none=True)
    validate_positive_int("batch_size", c.batch_size)
    validate_bool("offload", c.offload)
    c._normalize_overrides()
