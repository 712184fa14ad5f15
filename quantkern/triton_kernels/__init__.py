"""Triton kernels of quantkern: fused dequantize-matmul for GPTQ-style W{2..8}A16 weights.

Importing this package imports triton (``quantkern.kernels.triton_backend`` does so lazily). One op
per file: :mod:`.gemm_wna16` (tensor-core GEMM, M > 16) and :mod:`.gemv_wna16` (split-K decode,
M <= 16), both registered as ``torch.library`` ops (``quantkern::gemm_wna16_triton``,
``quantkern::gemv_wna16_triton``) with fake implementations. The weight layout they read is
:mod:`.layout`. On a CPU the kernels run only under ``TRITON_INTERPRET=1`` set *before* triton is
imported (for tests); then bf16 ``tl.dot`` operands are upcast to fp32 (an interpreter bug, see
:func:`._checks.dot_in_fp32`).
"""

from __future__ import annotations

import torch

from ._tuning import GEMM_CONFIGS, GEMV_CONFIGS, interpreting, tuned_configs
from .gemm_wna16 import _gemm_wna16_kernel, gemm_wna16, gemm_wna16_triton
from .gemv_wna16 import gemv_wna16, gemv_wna16_triton
from .layout import TritonWeight, from_gptq, pack_k_words, pack_triton_weight, unpack_k_words

DECODE_MAX_M = 16  # the split-K decode kernel runs M <= 16, the tensor-core GEMM above


def kernels_interpreted() -> bool:
    """True if the kernels and triton's own language helpers were built for the interpreter
    (TRITON_INTERPRET=1 was set when triton was first imported); a CPU run is possible only then."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_gemm_wna16_kernel, InterpretedFunction) and isinstance(tl.zeros, InterpretedFunction)


def wna16_matmul(x: torch.Tensor, w: TritonWeight, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """``x [M, K] @ dequant(w) (+ bias)`` -> ``[M, N]`` in x's dtype: the decode kernel for
    ``M <= DECODE_MAX_M``, the GEMM above; x is permuted first when the layout sorted act-order.

    ``config`` pins a launch config of the kernel that runs (see each kernel's wrapper); without it
    the registered ``torch.library`` ops run, autotuned.
    """
    if x.dim() != 2 or x.shape[-1] != w.in_features:
        raise ValueError(f"x must be [M, {w.in_features}], got shape {tuple(x.shape)}")
    if w.perm is not None:
        x = x.index_select(1, w.perm)
    args = (x, w.qweight, w.scales, w.zeros, w.g_idx, bias, w.bits, w.group_size, w.zero_point)
    decode = x.shape[0] <= DECODE_MAX_M
    if config is not None:
        return (gemv_wna16 if decode else gemm_wna16)(*args, config=config)
    return (gemv_wna16_triton if decode else gemm_wna16_triton)(*args)


__all__ = [
    "DECODE_MAX_M", "GEMM_CONFIGS", "GEMV_CONFIGS", "TritonWeight", "from_gptq", "gemm_wna16",
    "gemm_wna16_triton", "gemv_wna16", "gemv_wna16_triton", "interpreting", "kernels_interpreted",
    "pack_k_words", "pack_triton_weight", "tuned_configs", "unpack_k_words", "wna16_matmul",
]
