"""The kernels of the module family's other layouts: int8 W8A8 (``torch._int_mm``, Triton, the fp64
reference), fp8 (``torch._scaled_mm``, exact emulation), FP4 E2M1 and ZeroQuant (references).

Each is a :class:`~.registry.QuantKernel` like the GPTQ-layout ones: it declares its ``layouts``,
answers ``can_implement(spec, shape, device, dtype)``, is prepared from the module's tensors and runs
one registered op per call. Priorities keep ``Backend.AUTO`` where it was: ``torch._int_mm`` for W8A8
(the Triton W8A8 kernel has no GPU tuning behind it yet and runs only when asked), ``torch._scaled_mm``
for fp8 where the GPU has fp8 tensor cores, the emulation elsewhere.
"""

from __future__ import annotations

import os

import torch

from .registry import Backend, QuantKernel, register_kernel

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _float_input(dtype) -> tuple[bool, str | None]:
    if dtype not in _FLOAT_DTYPES:
        return False, f"activation dtype {dtype} is not one of fp32 / fp16 / bf16"
    return True, None


class _Prepared(QuantKernel):
    """Holds the module's tensors as they are (these kernels need no repacking); by default runs any
    float activations on any device."""

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        return _float_input(dtype)

    def __init__(self, tensors, dtype=None):
        super().__init__(tensors, dtype)
        self.t = dict(tensors.items())


# -- int8 W8A8 -----------------------------------------------------------------------------------------
@register_kernel
class Int8MMKernel(_Prepared):
    """``quantkern::w8a8_linear``: ``torch._int_mm`` (cuBLASLt / oneDNN) with its constraints handled
    inside the op (see :mod:`.w8a8`)."""

    backend, priority, layouts = Backend.INT_MM, 40, ("w8a8",)

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        if not hasattr(torch, "_int_mm"):
            return False, "this torch has no torch._int_mm"
        return _float_input(dtype)

    def apply(self, x):
        from .w8a8 import w8a8_linear

        t = self.t
        return w8a8_linear(x, t["weight"], t["weight_scale"], t["bias"], t["input_scale"])


@register_kernel
class TritonW8A8Kernel(_Prepared):
    """``quantkern::w8a8_linear_triton``: per-token (or static) int8 activations and the Triton int8
    GEMM with the dequantization epilogue fused; CUDA, or a CPU under ``TRITON_INTERPRET=1``."""

    backend, priority, layouts = Backend.TRITON, 60, ("w8a8",)

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        ok, why = _float_input(dtype)
        if not ok:
            return ok, why
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"):
            return False, "CPU tensors run Triton only under TRITON_INTERPRET=1 (tests)"
        if device.type not in ("cpu", "cuda"):
            return False, f"device {device.type!r} is not CUDA"
        try:
            import quantkern.triton_kernels.w8a8_int8  # noqa: F401
        except Exception as e:  # ImportError, or a triton too old for the kernel
            return False, f"the Triton W8A8 kernel does not import ({type(e).__name__}: {e})"
        return True, None

    def apply(self, x):
        from ..triton_kernels.w8a8_int8 import w8a8_linear_triton

        t = self.t
        return w8a8_linear_triton(x, t["weight"], t["weight_scale"], t["bias"], t["input_scale"])


@register_kernel
class W8A8ReferenceKernel(_Prepared):
    """``quantkern::w8a8_linear_ref``: the fp64 oracle (same activation quantization, exact int32 GEMM)."""

    backend, priority, layouts = Backend.REFERENCE, 100, ("w8a8",)

    def apply(self, x):
        from .w8a8 import w8a8_linear_ref_op

        t = self.t
        return w8a8_linear_ref_op(x, t["weight"], t["weight_scale"], t["bias"], t["input_scale"])


# -- fp8 E4M3 ------------------------------------------------------------------------------------------
class _FP8Kernel(_Prepared):
    """``quantkern::fp8_linear``, on ``torch._scaled_mm`` or emulated (``use_scaled_mm``)."""

    use_scaled_mm: bool

    def apply(self, x):
        from .w8a8 import fp8_linear

        t, a = self.t, self.spec.activation
        act = "none" if a is None else "static" if a.static else "dynamic"
        return fp8_linear(x, t["weight"], t["weight_scale"], t["bias"], t["input_scale"], act, self.use_scaled_mm)


@register_kernel
class ScaledMMKernel(_FP8Kernel):
    """``quantkern::fp8_linear`` on ``torch._scaled_mm``: CUDA with compute capability >= 8.9, K and N
    multiples of 16 (row-wise scales). Weight-only fp8 (no activation scheme) dequantizes into a GEMM
    in x's dtype, anywhere."""

    backend, priority, layouts = Backend.SCALED_MM, 30, ("fp8",)
    use_scaled_mm = True

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        ok, why = _float_input(dtype)
        if not ok or spec.activation is None:
            return ok, why
        if not (device.type == "cuda" and hasattr(torch, "_scaled_mm")
                and torch.cuda.get_device_capability(device) >= (8, 9)
                and shape.k % 16 == 0 and shape.n % 16 == 0):
            return False, ("needs a CUDA GPU with compute capability >= 8.9 and in/out features multiples of 16 "
                           f"(got {shape.k}->{shape.n}, device {device})")
        return True, None


@register_kernel
class FP8EmulatedKernel(_FP8Kernel):
    """``quantkern::fp8_linear`` emulated: the fp8 products are exact in fp32 (the fp8 reference)."""

    backend, priority, layouts = Backend.REFERENCE, 100, ("fp8",)
    use_scaled_mm = False


# -- FP4 E2M1 and ZeroQuant: references only -----------------------------------------------------------
@register_kernel
class FP4ReferenceKernel(_Prepared):
    """``quantkern::fp4_linear_ref``: decode the E2M1 codes, then a dense GEMM in x's dtype."""

    backend, priority, layouts = Backend.REFERENCE, 100, ("fp4",)

    def apply(self, x):
        from .fp4 import fp4_linear_ref

        t = self.t
        return fp4_linear_ref(x, t["weight_packed"], t["weight_scale"], t["bias"], self.spec.scheme.group_size)


@register_kernel
class ZeroQuantReferenceKernel(_Prepared):
    """``quantkern::zeroquant_linear_ref``: fake-quantized activations times the dequantized weight (fp32)."""

    backend, priority, layouts = Backend.REFERENCE, 100, ("zeroquant",)

    def apply(self, x):
        from .w8a8 import zeroquant_linear_ref

        t, a = self.t, self.spec.activation
        return zeroquant_linear_ref(x, t["weight"], t["weight_scale"], t["weight_zero_point"], t["g_idx"],
                                    t["input_scale"], t["input_zero_point"], t["bias"], a.bits, a.has_zero,
                                    a.unsign)
