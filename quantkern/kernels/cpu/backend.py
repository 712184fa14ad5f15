"""``Backend.CPU``: the fused C++ dequant-matmul for CPU tensors (csrc/cpu).

Every bit width 2..8, any group size (ragged last group included), symmetric or asymmetric,
act-order; fp32 / fp16 activations are computed in fp32 (AVX-512, AVX2 or portable code, chosen at
run time), bf16 activations with AVX-512 BF16 dot products where the CPU has them (exact products,
fp32 accumulation) and like fp32 elsewhere. The output has the input's dtype. The weight is repacked
once when the kernel is prepared (:mod:`.layout`); the extension is built or loaded lazily on first use
(:mod:`.build`), and a failure to build is this backend's ``can_implement`` reason: AUTO then falls
back to the reference and says why, an explicit ``backend="cpu"`` raises with the compiler's output.
"""

from __future__ import annotations

import torch

from ..registry import Backend, QuantKernel, register_kernel
from . import build, ops
from .layout import CONTAINER_BITS, pack_cpu_from_gptq

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@register_kernel
class CpuKernel(QuantKernel):
    backend = Backend.CPU
    priority = 50

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        if device.type != "cpu":
            return False, f"input is on {device.type}, the C++ CPU kernels run on CPU tensors"
        if dtype not in _DTYPES:
            return False, f"activation dtype {dtype} is not one of fp32 / bf16 / fp16"
        if spec.scheme.bits not in CONTAINER_BITS:
            return False, f"{spec.scheme.bits}-bit weights are not supported (bits {sorted(CONTAINER_BITS)})"
        err = build.load_error()
        if err is not None:
            return False, f"the C++ CPU extension is unavailable: {err}"
        return True, None

    owns_weights = True
    #: quantize activations to int8 per block of 32 per call and run the integer dot-product kernels
    #: (faster where the fp32 decode is compute-bound, e.g. AVX2; a different result: ``xhat @ W``, see
    #: :func:`~.ops.gemm`). Set by :func:`int8_activations`, off by default.
    int8_activations = False

    def __init__(self, tensors, dtype=None, isa: str | int | None = None):
        """Repack ``tensors`` once. ``isa`` forces a kernel variant (``portable``, ``avx2``, ``avx512``;
        default: the best this CPU runs). Raises :class:`~.build.ExtensionError` if the extension
        cannot be built or loaded, ``ValueError`` for an unknown ``isa``."""
        super().__init__(tensors, dtype)
        build.load()
        self.isa = ops.isa_level(isa)
        t = tensors
        self.packed = p = pack_cpu_from_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.spec.in_features)
        # bound once: a decode step makes hundreds of small calls, so the Python side stays minimal
        self._op = torch.ops.quantkern_cpu.gemm.default
        self._args = (p.w, p.scales, p.zs, p.gptr, p.src, p.cb, p.out_features)
        self._bias = t.bias

    def apply(self, x):
        return self._op(x, *self._args, self._bias, self.isa, self.int8_activations)


def int8_activations(model, enabled: bool = True) -> int:
    """Switch the prepared C++ CPU kernels (:class:`CpuKernel`) of every quantized module of ``model``
    to int8 activations (``enabled``) or back; returns how many kernels were switched. Prepare the
    kernels first (:func:`quantkern.nn.build_kernels`): kernels prepared later start with the default."""
    n = 0
    for mod in model.modules():
        cache = getattr(mod, "_kernels", None)
        for k in cache.prepared() if cache is not None else ():
            if isinstance(k, CpuKernel):
                k.int8_activations = bool(enabled)
                n += 1
    return n
