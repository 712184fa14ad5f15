"""Quantization schemes: what a weight (or activation) is quantized to, independent of layout."""

from __future__ import annotations

from dataclasses import dataclass

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)


def validate_bits(bits) -> int:
    """Return ``bits`` if it is an int in 2..8, else raise ``ValueError`` naming the allowed values."""
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise ValueError(f"bits must be an int in {SUPPORTED_BITS}, got {bits!r} ({type(bits).__name__})")
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return bits


def validate_group_size(group_size) -> int:
    """Return ``group_size`` if it is -1 (one group per output channel) or a positive int."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        raise ValueError(f"group_size must be -1 or a positive int, got {group_size!r}")
    if group_size == 0 or group_size < -1:
        raise ValueError(f"group_size must be -1 (per channel) or a positive int, got {group_size}")
    return group_size


@dataclass(frozen=True)
class WeightScheme:
    """Integer weight quantization: ``w = (q - zero) * scale`` with ``q`` in ``[0, 2**bits - 1]``.

    ``group_size`` -1 means one group spanning all input features. Symmetric schemes use the GPTQ
    convention ``zero = 2**(bits - 1)`` so that they pack into the same layouts as asymmetric ones.
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    act_order: bool = False

    def __post_init__(self):
        validate_bits(self.bits)
        validate_group_size(self.group_size)

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def num_groups(self, in_features: int) -> int:
        """Groups along the input dim; the last one is ragged when ``group_size`` does not divide it."""
        if self.group_size == -1:
            return 1
        return -(-in_features // self.group_size)

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W{self.bits} {g} {'sym' if self.sym else 'asym'}{' act-order' if self.act_order else ''}"
