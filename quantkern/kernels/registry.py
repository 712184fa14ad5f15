"""Kernel backends and their selection (DESIGN.md §4).

A backend is a :class:`QuantKernel` subclass. It never sees the ``nn.Module``: it answers

- ``can_implement(spec, shape, device, dtype) -> (ok, reason)`` from what a weight *is*
  (:class:`KernelSpec`: scheme, sizes, scale dtype, bias) and how it is *called*
  (:class:`CallShape`: the largest M of the calls it would serve), before any tensor is touched;
- ``prepare(tensors, dtype) -> kernel``: repack the canonical GPTQ tensors (:class:`WeightTensors`)
  once into its own layout; it may still decline (:class:`KernelDeclined`) for what only the tensors
  show (a hand-made ``g_idx``), and a prepared kernel may serve only up to ``max_m`` rows;
- ``kernel.apply(x) -> y``: one registered ``torch.library`` op call (a fake implementation and the
  alignment checks live in the op), so ``torch.compile(fullgraph=True)`` traces every backend.

So a transformers or vLLM integration can call a kernel with tensors it holds. The choice is made per
(device, activation dtype, M bucket) by :class:`KernelCache` (:data:`M_BUCKETS`): decode and prefill may
run different kernels. ``Backend.AUTO`` takes the first registered kernel that fits and, if that is only
the reference, says so once with every rejection reason; an explicitly requested backend that cannot
run raises with its reason. There is no process-wide switch: the choice lives on each module.
"""

from __future__ import annotations

import enum
import logging
import warnings
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..core import WeightScheme
from ..core.spec import ActivationScheme, FloatWeightScheme

logger = logging.getLogger("quantkern")


class Backend(str, enum.Enum):
    """One vocabulary for every quantized module: ``auto`` (the first registered kernel that fits),
    ``cuda`` / ``triton`` / ``cpu`` (quantkern's own kernels), ``int_mm`` / ``scaled_mm`` (torch's
    ``torch._int_mm`` / ``torch._scaled_mm`` paths) and ``reference`` (pure PyTorch; ``"emulated"``,
    the fp8 name, means the same)."""

    AUTO = "auto"
    CUDA = "cuda"
    TRITON = "triton"
    CPU = "cpu"
    INT_MM = "int_mm"
    SCALED_MM = "scaled_mm"
    REFERENCE = "reference"

    @classmethod
    def parse(cls, value) -> "Backend":
        if isinstance(value, cls):
            return value
        v = str(value).lower()
        try:
            return cls(_ALIASES.get(v, v))
        except ValueError:
            raise ValueError(f"unknown backend {value!r}; choose one of {[b.value for b in cls]}") from None


_ALIASES = {"emulated": "reference"}


class NoKernelError(RuntimeError):
    """No backend can run a layer; the message lists every backend's reason."""


class KernelDeclined(Exception):
    """Raised by :meth:`QuantKernel.prepare` when the tensors show what the spec did not (e.g. a
    ``g_idx`` that is not a permutation of contiguous groups); the message is the reason."""


@dataclass(frozen=True)
class KernelSpec:
    """What a kernel must know of one weight before it sees the tensors: the tensor ``layout`` the
    module holds (``"gptq"``: :class:`~quantkern.nn.QuantLinear`; ``"w8a8"``, ``"fp8"``, ``"fp4"``,
    ``"zeroquant"``: the other modules of the family; ``"gptq_experts"``: one projection of a
    :class:`~quantkern.nn.QuantExperts`, stacked over the experts, run by the grouped kernels of
    :mod:`quantkern.kernels.moe`), the weight scheme, the activation scheme (None: weight-only), the
    sizes (per expert), the scales' dtype and whether there is a bias."""

    scheme: WeightScheme | FloatWeightScheme
    in_features: int  # K
    out_features: int  # N
    scale_dtype: torch.dtype = torch.float16
    has_bias: bool = False
    layout: str = "gptq"
    activation: ActivationScheme | None = None
    #: the number of stacked experts (layout ``"gptq_experts"``, :mod:`quantkern.kernels.moe`); 0 otherwise
    num_experts: int = 0

    def describe(self) -> str:
        a = f", A {self.activation.describe()}" if self.activation is not None else ""
        e = f"{self.num_experts} experts x " if self.num_experts else ""
        return f"[{e}{self.in_features}->{self.out_features}, {self.scheme.describe()}{a}]"


@dataclass(frozen=True)
class CallShape:
    """The calls a kernel would serve: ``m_max`` is the largest number of rows (None: any), ``n`` and
    ``k`` the weight's output and input features."""

    m_max: int | None
    n: int
    k: int

    def fits(self, limit: int | None) -> bool:
        """True if every call of this shape has at most ``limit`` rows (None: no limit)."""
        return limit is None or (self.m_max is not None and self.m_max <= limit)


class WeightTensors:
    """The tensors of one weight as its module holds them (for the ``"gptq"`` layout the canonical
    ``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``, zeros in the v2 convention, see
    :mod:`quantkern.formats.gptq`; other layouts name theirs), its ``bias`` (or None) and its spec:
    what :meth:`QuantKernel.prepare` takes. Tensors are read as attributes (``t.qweight``)."""

    __slots__ = ("spec", "name", "_tensors")

    def __init__(self, spec: KernelSpec, name: str = "", **tensors: torch.Tensor | None):
        self.spec, self.name, self._tensors = spec, name, tensors

    def __getattr__(self, key):
        try:
            return self._tensors[key]
        except KeyError:
            raise AttributeError(f"{self.spec.layout!r} weight tensors have no {key!r}: "
                                 f"{sorted(self._tensors)}") from None

    def items(self):
        return self._tensors.items()

    @property
    def bits(self) -> int:
        return self.spec.scheme.bits


# Upper bounds of the M buckets a choice is cached for (the last bucket has no bound). A kernel's row
# limits must be bucket bounds (the CUDA GEMV's 8, the Triton decode kernel's 16), so that one choice
# holds for the whole bucket.
M_BUCKETS = (1, 8, 16, 64, 256)


def m_bucket(m: int) -> int | None:
    """The bound of the bucket of ``m`` rows: the smallest of :data:`M_BUCKETS` >= m, else None."""
    for b in M_BUCKETS:
        if m <= b:
            return b
    return None


def kernel_query(layer, x) -> tuple[KernelSpec, CallShape, torch.device, torch.dtype]:
    """The ``can_implement`` / :func:`select_kernel` arguments for running ``layer`` (anything with a
    ``kernel_spec()``, e.g. a :class:`~quantkern.nn.QuantLinear`) on activations like ``x`` (``[M, K]``;
    only its shape, device and dtype are read)."""
    spec = layer.kernel_spec()
    return spec, CallShape(m_bucket(x.shape[0]), spec.out_features, spec.in_features), x.device, x.dtype


class QuantKernel:
    """A backend's prepared kernel for one weight. Subclasses set ``backend`` and ``priority`` and
    implement :meth:`can_implement`, ``__init__(tensors, dtype)`` (or :meth:`prepare`) and :meth:`apply`."""

    backend: ClassVar[Backend]
    priority: ClassVar[int]  # lower runs first
    #: True when :meth:`apply` never reads the canonical GPTQ tensors (qweight / qzeros / scales /
    #: g_idx): the kernel holds everything it needs, so the module may release them
    owns_weights: ClassVar[bool] = False
    #: the most rows this prepared kernel runs (None: any); set per instance where the layout decides
    max_m: int | None = None
    #: the module tensor layouts (:attr:`KernelSpec.layout`) this kernel runs
    layouts: ClassVar[tuple[str, ...]] = ("gptq",)

    @classmethod
    def can_implement(cls, spec: KernelSpec, shape: CallShape, device: torch.device,
                      dtype: torch.dtype) -> tuple[bool, str | None]:
        raise NotImplementedError

    @classmethod
    def prepare(cls, tensors: WeightTensors, dtype: torch.dtype) -> "QuantKernel":
        """Repack ``tensors`` once for activations of ``dtype``; raises :class:`KernelDeclined`."""
        return cls(tensors, dtype)

    def __init__(self, tensors: WeightTensors, dtype: torch.dtype):
        self.name = tensors.name
        self.spec = tensors.spec

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` is ``[M, K]``, contiguous, on the weight's device; returns ``[M, N]`` in ``x.dtype``."""
        raise NotImplementedError


def check_same_device(owner, x: torch.Tensor, tensors) -> None:
    """Raise ``RuntimeError`` naming both devices when a tensor of ``tensors`` (``(name, tensor)`` pairs,
    None skipped) is not on ``x``'s device. ``owner``: a module (named by its ``describe()`` or
    ``name``) or a string. Device comparisons only: no sync, cheap enough for a forward. A weight on the
    meta device holds no data (never loaded / materialised): computing with it would return
    uninitialised memory."""
    for name, t in tensors:
        if t is not None and t.device != x.device:
            why = (" (the meta device holds no data: the layer's weights were never loaded or materialised)"
                   if t.device.type == "meta" else "")
            raise RuntimeError(f"{_owner_name(owner)}: the input is on {x.device} but {name} is on {t.device}{why}; "
                               "put the layer and its input on one device")


def _owner_name(owner) -> str:
    if isinstance(owner, str):
        return owner
    if callable(getattr(owner, "describe", None)):
        return owner.describe()
    name = getattr(owner, "name", "")
    return f"{type(owner).__name__} {name}" if name else type(owner).__name__


_KERNELS: list[type[QuantKernel]] = []
_warned: set[tuple] = set()


def register_kernel(cls: type[QuantKernel]) -> type[QuantKernel]:
    """Class decorator adding a kernel to the selection order (replacing one registered for the same
    backend and layouts)."""
    _KERNELS[:] = sorted([k for k in _KERNELS if (k.backend, k.layouts) != (cls.backend, cls.layouts)] + [cls],
                         key=lambda k: k.priority)
    return cls


def registered_kernels(layout: str | None = None) -> list[type[QuantKernel]]:
    """The registered kernels in selection order (those running ``layout`` only, if given)."""
    return [k for k in _KERNELS if layout is None or layout in k.layouts]


def _candidates(backend: Backend, layout: str) -> list[type[QuantKernel]]:
    return [k for k in _KERNELS if layout in k.layouts and (backend is Backend.AUTO or k.backend is backend)]


def select_kernel(spec: KernelSpec, shape: CallShape, device: torch.device, dtype: torch.dtype,
                  backend: Backend | str = Backend.AUTO, what: str = "") -> type[QuantKernel]:
    """The first registered kernel class whose ``can_implement`` accepts these calls (static answer:
    :meth:`KernelCache.get` also lets :meth:`~QuantKernel.prepare` decline). Raises
    :class:`NoKernelError` listing every reason."""
    backend = Backend.parse(backend)
    reasons: list[str] = []
    for k in _accepting(spec, shape, device, dtype, backend, reasons):
        return k
    raise _no_kernel(backend, reasons, what or spec.describe(), device, dtype)


def _accepting(spec, shape, device, dtype, backend: Backend, reasons: list[str]):
    """The candidate kernel classes whose ``can_implement`` accepts, in order; the others' reasons
    are appended to ``reasons``."""
    for k in _candidates(backend, spec.layout):
        ok, reason = k.can_implement(spec, shape, device, dtype)
        if ok:
            yield k
        else:
            reasons.append(f"{k.backend.value}: {reason}")


def _no_kernel(backend: Backend, reasons: list[str], what: str, device, dtype) -> NoKernelError:
    if backend is not Backend.AUTO and not reasons:
        return NoKernelError(f"backend {backend.value!r} has no kernel for {what}")
    return NoKernelError(f"no kernel can run {what} for {device.type}/{dtype} input: " + "; ".join(reasons))


class KernelCache:
    """The kernels of one weight: chosen per (device, dtype, M bucket), each kernel class prepared
    (repacked) once per (device, dtype) and shared by the buckets that chose it.

    ``tensors``: a callable returning the :class:`WeightTensors` to prepare from (called only when a
    kernel must be prepared; it may raise, e.g. after the module released its canonical tensors)."""

    def __init__(self):
        self._by_bucket: dict[tuple, QuantKernel] = {}
        self._prepared: dict[tuple, QuantKernel] = {}

    def __bool__(self) -> bool:
        return bool(self._prepared)

    def clear(self) -> None:
        self._by_bucket.clear()
        self._prepared.clear()

    def prepared(self) -> list[QuantKernel]:
        """Every kernel prepared so far."""
        return list(self._prepared.values())

    def built_for(self) -> list[tuple[torch.device, torch.dtype]]:
        """The (device, dtype) pairs some kernel was prepared for."""
        return list(dict.fromkeys((d, t) for d, t, _ in self._prepared))

    def lookup(self, x: torch.Tensor) -> QuantKernel | None:
        """The kernel already chosen for ``x``'s device, dtype and M bucket, or None."""
        return self._by_bucket.get((x.device, x.dtype, m_bucket(x.shape[0])))

    def get(self, x: torch.Tensor, spec: KernelSpec, tensors, backend: Backend = Backend.AUTO,
            what: str = "") -> QuantKernel:
        """The kernel for ``x`` (``[M, K]``), chosen and prepared on first need."""
        key = (x.device, x.dtype, m_bucket(x.shape[0]))
        k = self._by_bucket.get(key)
        if k is None:
            k = self._choose(key, spec, tensors, Backend.parse(backend), what or spec.describe())
            self._by_bucket[key] = k
        return k

    def _choose(self, key, spec: KernelSpec, tensors, backend: Backend, what: str) -> QuantKernel:
        device, dtype, bucket = key
        shape = CallShape(bucket, spec.out_features, spec.in_features)
        reasons: list[str] = []
        for cls in _accepting(spec, shape, device, dtype, backend, reasons):
            pkey = (device, dtype, cls)
            k = self._prepared.get(pkey)
            if k is None:
                try:
                    k = cls.prepare(tensors(), dtype)
                except KernelDeclined as e:
                    reasons.append(f"{cls.backend.value}: {e}")
                    continue
                self._prepared[pkey] = k
            if not shape.fits(k.max_m):
                rows = f"up to {bucket}" if bucket is not None else f"above {M_BUCKETS[-1]}"
                reasons.append(f"{cls.backend.value}: this weight's layout runs M <= {k.max_m}, got M {rows}")
                continue
            if backend is Backend.AUTO and cls.backend is Backend.REFERENCE and reasons:
                wkey = (device.type, dtype, tuple(reasons))
                if wkey not in _warned:
                    _warned.add(wkey)
                    logger.warning("quantkern: no fused kernel for %s on %s/%s, using the reference path "
                                   "(dequantize + matmul). Reasons: %s", what, device.type, dtype, "; ".join(reasons))
            return k
        raise _no_kernel(backend, reasons, what, device, dtype)


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)
