"""Triton kernels of quantkern: fused dequantize-matmul for GPTQ-style W{2..8}A16 weights.

Importing this package imports triton (``quantkern.kernels.triton_backend`` does so lazily). One op
per file: :mod:`.gemm_wna16` (tensor-core GEMM, M > 16) and :mod:`.gemv_wna16` (split-K decode,
M <= 16), both registered as ``torch.library`` ops (``quantkern::gemm_wna16_triton``,
``quantkern::gemv_wna16_triton``) with fake implementations; a whole Linear (act-order permutation
and the choice by M included) is the one op ``quantkern::wna16_linear_triton``. :mod:`.moe_wna16` is the
grouped GEMM of MoE experts (every expert of one projection in one launch, ``quantkern::moe_wna16_triton``).
The weight layout they read is :mod:`.layout`. On a CPU the kernels run only under ``TRITON_INTERPRET=1`` set *before* triton is
imported (for tests); then bf16 ``tl.dot`` operands are upcast to fp32 (an interpreter bug, see
:func:`._checks.dot_in_fp32`).
"""

from __future__ import annotations

import torch

from ._tuning import GEMM_CONFIGS, GEMV_CONFIGS, MOE_CONFIGS, interpreting, tuned_configs
from .gemm_wna16 import _gemm_wna16_kernel, gemm_wna16, gemm_wna16_triton
from .gemv_wna16 import gemv_wna16, gemv_wna16_triton
from .layout import (TritonExperts, TritonWeight, experts_from_gptq, from_gptq, pack_k_words, pack_triton_weight,
                     unpack_k_words)
from .moe_wna16 import moe_wna16, moe_wna16_matmul, moe_wna16_triton

DECODE_MAX_M = 16  # the split-K decode kernel runs M <= 16, the tensor-core GEMM above


def kernels_interpreted() -> bool:
    """True if the kernels and triton's own language helpers were built for the interpreter
    (TRITON_INTERPRET=1 was set when triton was first imported); a CPU run is possible only then."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_gemm_wna16_kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


def _wna16_linear(x, qweight, scales, zeros, g_idx, perm, bias, bits, group_size, zero_point, config=None):
    if perm is not None:
        x = x.index_select(1, perm)
    fn = gemv_wna16 if x.shape[0] <= DECODE_MAX_M else gemm_wna16
    return fn(x, qweight, scales, zeros, g_idx, bias, bits, group_size, zero_point, config=config)


@torch.library.custom_op("quantkern::wna16_linear_triton", mutates_args=())
def wna16_linear_triton(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        g_idx: torch.Tensor, perm: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                        group_size: int, zero_point: int) -> torch.Tensor:
    """A whole weight-only Linear as one ``torch.library`` op: the act-order permutation of x (when the
    layout sorted K), then the autotuned decode kernel (M <= :data:`DECODE_MAX_M`) or the GEMM."""
    return _wna16_linear(x, qweight, scales, zeros, g_idx, perm, bias, bits, group_size, zero_point)


@wna16_linear_triton.register_fake
def _(x, qweight, scales, zeros, g_idx, perm, bias, bits, group_size, zero_point):
    torch._check(x.dim() == 2, lambda: f"x must be 2-D, got {x.dim()}-D")
    torch._check(scales.dim() == 2, lambda: "scales must be 2-D")
    return x.new_empty(x.shape[0], scales.shape[1])


def wna16_matmul(x: torch.Tensor, w: TritonWeight, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(w) (+ bias)`` -> ``[M, N]`` in x's dtype: the decode kernel for
    ``M <= DECODE_MAX_M``, the GEMM above; x is permuted first when the layout sorted act-order.

    ``config`` pins a launch config of the kernel that runs (see each kernel's wrapper); without it
    the registered ``quantkern::wna16_linear_triton`` op runs, autotuned.
    """
    if x.dim() != 2 or x.shape[-1] != w.in_features:
        raise ValueError(f"x must be [M, {w.in_features}], got shape {tuple(x.shape)}")
    args = (x, w.qweight, w.scales, w.zeros, w.g_idx, w.perm, bias, w.bits, w.group_size, w.zero_point)
    if config is not None:
        return _wna16_linear(*args, config=config)
    return wna16_linear_triton(*args)


__all__ = [
    "DECODE_MAX_M", "GEMM_CONFIGS", "GEMV_CONFIGS", "MOE_CONFIGS", "TritonExperts", "TritonWeight", "experts_from_gptq",
    "from_gptq", "gemm_wna16", "gemm_wna16_triton", "gemv_wna16", "gemv_wna16_triton", "interpreting",
    "kernels_interpreted", "moe_wna16", "moe_wna16_matmul", "moe_wna16_triton", "pack_k_words", "pack_triton_weight",
    "tuned_configs", "unpack_k_words", "wna16_linear_triton", "wna16_matmul",
]
