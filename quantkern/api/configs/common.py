"""What the configs of the calibrated algorithms beyond GPTQ share: calibration fields, per-layer overrides,
value checks.

Common settings (names as users know them from other tools): ``overrides`` (per-layer settings, see
:class:`PerLayer`), ``skip_layers`` (fnmatch patterns or
dotted suffixes), ``device`` (where calibration runs), ``num_calibrate`` (use at most this many
calibration samples), ``calibrate_seq_length`` (truncate each sample to this many tokens),
``batch_size`` (rows per calibration forward), ``offload`` (keep captured block inputs on the CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import PerLayer  # noqa: F401  (re-exported: the calibrated configs' per-layer overrides)


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


def validate_calibration_fields(c) -> None:
    validate_positive_int("num_calibrate", c.num_calibrate, allow_none=True)
    validate_positive_int("calibrate_seq_length", c.calibrate_seq_length, allow_none=True)
    validate_positive_int("batch_size", c.batch_size)
    validate_bool("offload", c.offload)
    c._normalize_overrides()
