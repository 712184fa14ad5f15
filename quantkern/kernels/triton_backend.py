"""The Triton backend: fused dequantize-matmul kernels of :mod:`quantkern.triton_kernels`.

Declared capabilities: weights of 2..8 bits, any group size (regular groups take the fast path,
others and arbitrary ``g_idx`` are gathered in-kernel), symmetric and asymmetric zeros, act-order
(K sorted by group once at load, activations permuted per call), fp16 / bf16 activations with fp32
accumulation, fp16 / bf16 / fp32 scales, optional bias, any M / N / K. Devices: CUDA with compute
capability >= 7.0 (bf16 needs >= 8.0); a CPU only under ``TRITON_INTERPRET=1`` (tests), so that the
production CPU path never picks Triton by accident. triton is imported lazily, in ``can_implement``.

Two kernels share these rules (:func:`triton_support`): :class:`TritonKernel` (a Linear, layout
``"gptq"``) and :class:`TritonGroupedKernel` (one projection of stacked MoE experts, layout
``"gptq_experts"``, :mod:`quantkern.kernels.moe`).
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from .moe import EXPERTS_LAYOUT
from .registry import Backend, QuantKernel, register_kernel

_ACT_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _import_error() -> str | None:
    """``None`` if ``quantkern.triton_kernels`` imports, else why not (cached: imported once)."""
    try:
        importlib.import_module("quantkern.triton_kernels")
    except Exception as e:  # ImportError, or a triton too old for the kernels
        return f"quantkern.triton_kernels does not import ({type(e).__name__}: {e})"
    return None


def triton_support(spec, device: torch.device, dtype: torch.dtype) -> tuple[bool, str | None]:
    """What every Triton kernel (dense and grouped) needs: fp16 / bf16 activations, fp16 / bf16 / fp32
    scales, 2..8-bit weights, CUDA cc >= 7.0 (bf16: >= 8.0) or a CPU under ``TRITON_INTERPRET=1`` with
    the kernels built interpreted, and an importable :mod:`quantkern.triton_kernels`."""
    if dtype not in _ACT_DTYPES:
        return False, f"activation dtype {dtype} is not fp16 / bf16"
    if spec.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"scales dtype {spec.scale_dtype} is not fp16 / bf16 / fp32"
    if not 2 <= spec.scheme.bits <= 8:
        return False, f"{spec.scheme.bits}-bit weights are not supported (2..8)"
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (7, 0):
            return False, f"compute capability {cap[0]}.{cap[1]} < 7.0"
        if dtype == torch.bfloat16 and cap < (8, 0):
            return False, f"bf16 needs compute capability >= 8.0, device has {cap[0]}.{cap[1]}"
    elif device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0").lower() not in ("1", "true", "yes", "on"):
            return False, "CPU tensors run Triton only under TRITON_INTERPRET=1 (tests)"
    else:
        return False, f"device {device.type!r} is not CUDA"
    err = _import_error()
    if err:
        return False, err
    if device.type == "cpu":
        from quantkern.triton_kernels import kernels_interpreted

        if not kernels_interpreted():
            return False, "triton was imported before TRITON_INTERPRET=1 was set (kernels not interpreted)"
    return True, None


@register_kernel
class TritonKernel(QuantKernel):
    """Runs a weight through the Triton WnA16 kernels (decode kernel for M <= 16, GEMM above), one
    ``quantkern::wna16_linear_triton`` op per call.

    ``config`` (a dict, default None = autotune) pins the launch config of both kernels for
    debugging; see :func:`quantkern.triton_kernels.wna16_matmul`.
    """

    backend = Backend.TRITON
    priority = 20

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        return triton_support(spec, device, dtype)

    owns_weights = True  # self.weight (for 2 / 4 / 8 bits it shares the storage of qweight and scales)

    def __init__(self, tensors, dtype=None):
        super().__init__(tensors, dtype)
        from quantkern.triton_kernels import from_gptq

        t = tensors
        self.weight = from_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.spec.in_features,
                                group_size=t.spec.scheme.group_size)
        self.bias = t.bias
        self.config: dict | None = None

    def apply(self, x):
        from quantkern.triton_kernels import wna16_matmul

        return wna16_matmul(x, self.weight, self.bias, config=self.config)


@register_kernel
class TritonGroupedKernel(QuantKernel):
    """Runs one projection of a :class:`~quantkern.nn.QuantExperts` (layout ``"gptq_experts"``) through the
    fused MoE kernel of :mod:`quantkern.triton_kernels.moe_wna16`: every expert in one launch, one
    ``quantkern::moe_wna16_triton`` op per call, no host sync on the routing. Same devices, dtypes and
    schemes as :class:`TritonKernel`; the experts are repacked once (:func:`~quantkern.triton_kernels.layout.experts_from_gptq`:
    act-order experts get K sorted by group, their activations are gathered through the permutation
    inside the kernel).

    ``config`` (a dict, default None = autotune) pins the launch config for debugging; see
    :func:`quantkern.triton_kernels.moe_wna16`.
    """

    backend = Backend.TRITON
    priority = 20
    layouts = (EXPERTS_LAYOUT,)
    owns_weights = True  # self.weight (for 2 / 4 / 8 bits without act-order it shares qweight and scales)

    @classmethod
    def can_implement(cls, spec, shape, device, dtype):
        return triton_support(spec, device, dtype)

    def __init__(self, tensors, dtype=None):
        super().__init__(tensors, dtype)
        from quantkern.triton_kernels import experts_from_gptq

        t = tensors
        self.weight = experts_from_gptq(t.qweight, t.qzeros, t.scales, t.g_idx, t.bits, t.spec.in_features,
                                        group_size=t.spec.scheme.group_size)
        self.bias = t.bias
        self.config: dict | None = None

    def apply(self, x, rows, offsets):
        from quantkern.triton_kernels import moe_wna16_matmul

        return moe_wna16_matmul(x, rows, offsets, self.weight, self.bias, config=self.config)
