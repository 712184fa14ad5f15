"""Kernel backends and their selection (DESIGN.md §4).

Each backend is a :class:`QuantKernel` subclass that declares what it can do through
``can_implement(layer, x) -> (ok, reason)`` and, when built for a layer, repacks the layer's
canonical GPTQ tensors once into whatever layout it wants. Selection walks the registered kernels in
priority order. ``Backend.AUTO`` takes the first that fits and, if that is only the reference, says so
once with every rejection reason; an explicitly requested backend that cannot run raises with its
reason. There is no process-wide switch: the choice lives on each ``QuantLinear``.
"""

from __future__ import annotations

import enum
import logging
import warnings
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..nn.quant_linear import QuantLinear

logger = logging.getLogger("quantkern")


class Backend(str, enum.Enum):
    AUTO = "auto"
    CUDA = "cuda"
    TRITON = "triton"
    CPU = "cpu"
    REFERENCE = "reference"

    @classmethod
    def parse(cls, value) -> "Backend":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown backend {value!r}; choose one of {[b.value for b in cls]}") from None


class NoKernelError(RuntimeError):
    """No backend can run a layer; the message lists every backend's reason."""


class QuantKernel:
    """A backend's implementation for one layer. Subclasses set ``backend`` and ``priority``."""

    backend: ClassVar[Backend]
    priority: ClassVar[int]  # lower runs first
    #: True when ``__call__`` never reads the layer's canonical GPTQ buffers (qweight / qzeros /
    #: scales / g_idx): the kernel holds everything it needs, so
    #: :meth:`~quantkern.nn.QuantLinear.release_canonical` may drop them
    owns_weights: ClassVar[bool] = False

    @classmethod
    def can_implement(cls, layer: "QuantLinear", x: torch.Tensor) -> tuple[bool, str | None]:
        raise NotImplementedError

    def __init__(self, layer: "QuantLinear"):
        self.layer_name = getattr(layer, "name", "")

    def __call__(self, layer: "QuantLinear", x: torch.Tensor) -> torch.Tensor:
        """``x`` is ``[M, K]``, contiguous, on the layer's device; returns ``[M, N]`` in ``x.dtype``."""
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
    """Class decorator adding a backend to the selection order."""
    _KERNELS[:] = sorted([k for k in _KERNELS if k.backend != cls.backend] + [cls], key=lambda k: k.priority)
    return cls


def registered_kernels() -> list[type[QuantKernel]]:
    return list(_KERNELS)


def select_kernel(layer: "QuantLinear", x: torch.Tensor, backend: Backend = Backend.AUTO) -> type[QuantKernel]:
    """Pick the kernel class for ``layer`` applied to activations like ``x``.

    Raises :class:`NoKernelError` when an explicit ``backend`` cannot run, listing its reason, and
    ``RuntimeError`` naming both devices when a buffer of ``layer`` is not on ``x``'s device.
    """
    check_same_device(layer, x, layer.named_buffers(recurse=False))
    backend = Backend.parse(backend)
    reasons: list[str] = []
    for k in _KERNELS:
        if backend is not Backend.AUTO and k.backend is not backend:
            continue
        ok, reason = k.can_implement(layer, x)
        if ok:
            if backend is Backend.AUTO and k.backend is Backend.REFERENCE and reasons:
                key = (x.device.type, x.dtype, tuple(reasons))
                if key not in _warned:
                    _warned.add(key)
                    logger.warning("quantkern: no fused kernel for %s on %s/%s, using the reference path "
                                   "(dequantize + matmul). Reasons: %s", layer.describe(), x.device.type,
                                   x.dtype, "; ".join(reasons))
            return k
        reasons.append(f"{k.backend.value}: {reason}")
    if backend is not Backend.AUTO and not reasons:
        raise NoKernelError(f"backend {backend.value!r} is not available in this build of quantkern")
    raise NoKernelError(f"no kernel can run {layer.describe()} for {x.device.type}/{x.dtype} input: " + "; ".join(reasons))


def warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)
