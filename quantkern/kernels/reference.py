"""Pure-PyTorch reference of the GPTQ-layout weight-only GEMM.

This is the CPU / anywhere fallback, the test oracle every fused kernel is compared with, and the
baseline of the benchmarks. It dequantizes the whole weight, then calls ``torch.matmul``.
"""

from __future__ import annotations

import torch

from ..formats.bitpack import unpack_cols, unpack_rows


def dequantize_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    in_features: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Dense weight ``[in_features, out_features]`` (K x N, ready for ``x @ W``) from GPTQ tensors
    with v2 (as-is) zeros. ``dtype`` defaults to the scales' dtype."""
    dtype = dtype or scales.dtype
    n = scales.shape[1]
    codes = unpack_rows(qweight, bits, in_features)  # [K, N]
    zeros = unpack_cols(qzeros, bits, n)  # [G, N]
    g = g_idx.long()
    w = (codes - zeros[g]).to(torch.float32) * scales[g].to(torch.float32)
    return w.to(dtype)


def gptq_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ dequant(W) [K, N] (+ bias)`` in ``x.dtype``."""
    w = dequantize_gptq(qweight, qzeros, scales, g_idx, bits, x.shape[-1], dtype=x.dtype)
    y = x @ w
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y


@torch.library.custom_op("quantkern::gptq_gemm_ref", mutates_args=())
def gptq_gemm_ref_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor,
    bits: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return gptq_gemm_reference(x, qweight, qzeros, scales, g_idx, bits, bias)


@gptq_gemm_ref_op.register_fake
def _(x, qweight, qzeros, scales, g_idx, bits, bias=None):
    return x.new_empty(x.shape[0], scales.shape[1])
