"""The reference backend: always available, any device, any scheme."""

from __future__ import annotations

import torch

from .reference import gptq_gemm_ref_op
from .registry import Backend, QuantKernel, register_kernel

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@register_kernel
class ReferenceKernel(QuantKernel):
    """Dequantize + matmul on the canonical tensors (the one ``quantkern::gptq_gemm_ref`` op)."""

    backend = Backend.REFERENCE
    priority = 100

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        if dtype not in _FLOAT_DTYPES:
            return False, f"activation dtype {dtype} is not one of fp32 / fp16 / bf16"
        return True, None

    def __init__(self, tensors, dtype):
        super().__init__(tensors, dtype)
        t = tensors
        self._args = (t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.bias)

    def apply(self, x):
        return gptq_gemm_ref_op(x, *self._args)
