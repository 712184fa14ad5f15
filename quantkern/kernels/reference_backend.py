"""The reference backend: always available, any device, any scheme."""

from __future__ import annotations

import torch

from .reference import gptq_gemm_ref_op
from .registry import Backend, QuantKernel, register_kernel

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@register_kernel
class ReferenceKernel(QuantKernel):
    backend = Backend.REFERENCE
    priority = 100

    @classmethod
    def can_implement(cls, layer, x):
        if x.dtype not in _FLOAT_DTYPES:
            return False, f"activation dtype {x.dtype} is not one of fp32 / fp16 / bf16"
        return True, None

    def __call__(self, layer, x):
        return gptq_gemm_ref_op(x, layer.qweight, layer.qzeros, layer.scales, layer.g_idx, layer.bits, layer.bias)
