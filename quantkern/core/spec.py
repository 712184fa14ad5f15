"""Sites and specs: the common currency of planners, algorithms, kernels and formats (DESIGN.md §1).

- :class:`Site`: one quantizable weight: a module path, the parameter's name, and for 3-D MoE
  expert tensors the expert index.
- :class:`Spec`: how it is quantized: the weight scheme (integer :class:`~.scheme.WeightScheme`, or
  :class:`FloatWeightScheme` for fp8 / fp4), an optional :class:`ActivationScheme` and the input
  transforms folded in before it (``"smooth"`` scales today).
- A plan is ``{Site: Spec}`` (:data:`Plan`).

Everything here is plain frozen data: hashable, comparable, printable, and free of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .scheme import WeightScheme

FLOAT_WEIGHT_FORMATS = ("fp8_e4m3", "fp4_e2m1")
ACTIVATION_FORMATS = ("int", "fp8_e4m3")


@dataclass(frozen=True, order=True)
class Site:
    """One quantizable weight: ``module`` (dotted path), ``param`` and, for a 3-D experts tensor, the
    ``expert`` index. Printed as the dotted name patterns match: ``layers.0.mlp.experts.3.gate_up_proj``."""

    module: str
    param: str = "weight"
    expert: int | None = None

    @property
    def name(self) -> str:
        if self.expert is not None:
            return f"{self.module}.{self.expert}.{self.param}"
        return self.module

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class FloatWeightScheme:
    """Floating-point weights: fp8 E4M3 with one scale per output channel (``group_size`` -1), or fp4
    E2M1 with group scales."""

    format: str = "fp8_e4m3"
    group_size: int = -1

    def __post_init__(self):
        if self.format not in FLOAT_WEIGHT_FORMATS:
            raise ValueError(f"format must be one of {FLOAT_WEIGHT_FORMATS}, got {self.format!r}")

    @property
    def bits(self) -> int:
        return 8 if self.format == "fp8_e4m3" else 4

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        return f"W {self.format} {g}"


@dataclass(frozen=True)
class ActivationScheme:
    """Quantized activations: ``int`` (``bits``, symmetric unless ``has_zero``; unsigned codes with
    ``unsign``) or ``fp8_e4m3``; per token
    and computed at run time (``static`` False) or one calibrated per-tensor scale (``static`` True)."""

    format: str = "int"
    bits: int = 8
    static: bool = False
    has_zero: bool = False
    unsign: bool = False  # integer codes in [0, 2^bits) rather than signed

    def __post_init__(self):
        if self.format not in ACTIVATION_FORMATS:
            raise ValueError(f"activation format must be one of {ACTIVATION_FORMATS}, got {self.format!r}")

    def describe(self) -> str:
        kind = f"int{self.bits}" if self.format == "int" else self.format
        return f"{kind} {'static per-tensor' if self.static else 'dynamic per-token'}" + (" asym" if self.has_zero else "")


@dataclass(frozen=True)
class Spec:
    """How one site is quantized."""

    weight: WeightScheme | FloatWeightScheme
    activation: ActivationScheme | None = None
    transforms: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        a = f", A {self.activation.describe()}" if self.activation is not None else ""
        t = f" after {'+'.join(self.transforms)}" if self.transforms else ""
        return f"{self.weight.describe()}{a}{t}"


#: a plan: how every planned site is quantized
Plan = dict[Site, Spec]
