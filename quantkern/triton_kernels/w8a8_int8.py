"""Triton W8A8 int8 GEMM with the dequantization epilogue fused.

    y[m, n] = (Σ_k a[m, k] · b[n, k]) · a_scale[m] · b_scale[n] (+ bias[n])

``a`` int8 ``[M, K]`` (activations quantized per token by the caller), ``b`` int8 ``[N, K]`` (the
``W8A8Linear.weight`` layout, read transposed by strides: no copy), ``a_scale`` fp32 ``[M]`` (or one
value broadcast for static per-tensor scales), ``b_scale`` fp32 ``[N]``, ``bias`` ``[N]`` or None;
output ``[M, N]`` in ``out_dtype`` (fp16 / bf16 / fp32). Accumulation is int32 through ``tl.dot``
(int8 tensor cores on sm80+), so it is exact; the epilogue is fp32. Any M, N, K (masked tiles).

Tiles: ``BLOCK_M`` 16 for decode-sized M (<= 16), else 64; ``BLOCK_N`` 64, ``BLOCK_K`` 64. Fixed, not
autotuned: there is no GPU timing behind a choice yet (the W8A8 module's ``auto`` backend therefore
prefers ``torch._int_mm``; this kernel runs with ``backend="triton"``). On a CPU it runs only under
``TRITON_INTERPRET=1`` set before triton is imported (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _w8a8_int8_kernel(a_ptr, b_ptr, c_ptr, as_ptr, bs_ptr, bias_ptr, M, N, K,
                      stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn, stride_as,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0)
        b = tl.load(b_ptr + offs_n[None, :] * stride_bn + ks[:, None] * stride_bk,
                    mask=(offs_n[None, :] < N) & (ks[:, None] < K), other=0)
        acc += tl.dot(a, b, out_dtype=tl.int32)
    a_s = tl.load(as_ptr + offs_m * stride_as, mask=offs_m < M, other=0.0)
    b_s = tl.load(bs_ptr + offs_n, mask=offs_n < N, other=0.0)
    c = acc.to(tl.float32) * a_s[:, None] * b_s[None, :]
    if HAS_BIAS:
        c += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, c.to(c_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def w8a8_int8_matmul_triton(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                            bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """See the module docstring; raises ``ValueError`` for wrong dtypes / shapes before launching."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"w8a8 triton: a and b must be 2-D int8, got {a.dtype} {tuple(a.shape)}, "
                         f"{b.dtype} {tuple(b.shape)}")
    m, k = a.shape
    n = b.shape[0]
    if b.shape[1] != k:
        raise ValueError(f"w8a8 triton: a is [M={m}, K={k}] but b is {tuple(b.shape)} (expected [N, {k}])")
    a_scale = a_scale.reshape(-1).float()
    if a_scale.numel() not in (1, m):
        raise ValueError(f"w8a8 triton: a_scale has {a_scale.numel()} values for M={m} rows (need 1 or M)")
    b_scale = b_scale.reshape(-1).float().contiguous()
    if b_scale.numel() != n:
        raise ValueError(f"w8a8 triton: b_scale has {b_scale.numel()} values for N={n}")
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"w8a8 triton: out_dtype must be fp16 / bf16 / fp32, got {out_dtype}")
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    block_m = 16 if m <= 16 else 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, 64))
    _w8a8_int8_kernel[grid](
        a, b, c, a_scale, b_scale, bias if bias is not None else b_scale, m, n, k,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        0 if a_scale.numel() == 1 else a_scale.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_K=64)
    return c


@torch.library.custom_op("quantkern::w8a8_linear_triton", mutates_args=())
def w8a8_linear_triton(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """A whole W8A8 Linear as one op: x quantized to int8 per token (or with the static ``input_scale``),
    then :func:`w8a8_int8_matmul_triton`; the result in x's dtype."""
    from ..core.int8 import quantize_int8_per_token, quantize_int8_static

    if input_scale is None:
        xq, xs = quantize_int8_per_token(x2d)
    else:
        xq, xs = quantize_int8_static(x2d, input_scale), input_scale
    return w8a8_int8_matmul_triton(xq, xs, weight, weight_scale, bias, x2d.dtype)


@w8a8_linear_triton.register_fake
def _(x2d, weight, weight_scale, bias=None, input_scale=None):
    return x2d.new_empty(x2d.shape[0], weight.shape[0])
