"""W8A8 kernels and their references: int8 (below) and fp8 E4M3 (the section further down). The codecs
they run on live in :mod:`quantkern.core.int8` and :mod:`quantkern.core.fp8`.

W8A8 int8: per-output-channel int8 weights x int8 activations (per-token dynamic or per-tensor static).

``y[m, n] = (Σ_k xq[m, k] · wq[n, k]) · x_scale[m] · w_scale[n] + bias[n]`` with int32 accumulation.

Layouts: ``weight`` int8 ``[N, K]`` (``nn.Linear`` layout, symmetric, codes in [-127, 127]),
``weight_scale`` fp32 ``[N, 1]``, ``input_scale`` fp32 ``[1]`` (static) or None (dynamic per token),
``bias`` ``[N]`` or None. Activations ``x2d`` ``[M, K]`` fp32 / fp16 / bf16; the output has x's dtype.

Paths for the int8 GEMM (``int8_mm``): ``torch._int_mm`` (cuBLASLt int8 on CUDA; oneDNN on CPU, or an
exact fp32 GEMM of the codes on CPU when ``K·127² < 2^24``, which was faster there), with
CUDA's constraints handled here (M > 16 is needed: small M is zero-padded; K and N must be multiples
of 8, otherwise an exact fp64 product runs, since int32 matmul is CPU-only). The whole layer is the
``quantkern::w8a8_linear`` custom op (with a fake implementation for tracing);
:func:`w8a8_linear_reference` is its fp64 oracle. The fp8 layer is ``quantkern::fp8_linear``
(``torch._scaled_mm`` on sm89+, exact fp32 emulation elsewhere), oracle :func:`fp8_linear_reference`.
"""

from __future__ import annotations

import torch

from ..core.fp8 import cast_to_fp8, quantize_fp8_per_row
from ..core.int8 import (INT8_MAX, dequantize_codes, quantize_int8_per_token, quantize_int8_static, quantize_rows,
                         quantize_with)


def int8_mm_reference(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """Exact int32 ``a [M, K] @ b_t[N, K]^T`` (the oracle)."""
    return a.to(torch.int32) @ b_t.to(torch.int32).t()


def int8_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int32 ``a [M, K] @ b_t [N, K]^T`` through ``torch._int_mm`` where it applies."""
    m, k = a.shape
    n = b_t.shape[0]
    if not hasattr(torch, "_int_mm") or m == 0:
        return int8_mm_reference(a, b_t)
    if a.is_cuda:
        if k % 8 or n % 8:
            return _cuda_fallback(a, b_t)
        if m <= 16:  # cuBLASLt int8 path needs M > 16: pad with zero rows
            pad = torch.zeros(17 - m, k, dtype=a.dtype, device=a.device)
            return torch._int_mm(torch.cat([a, pad]), b_t.t())[:m]
    if k * INT8_MAX * INT8_MAX < 2 ** 24:
        # CPU: an fp32 GEMM on the codes is exact here (every partial sum is an integer below 2^24,
        # so fp32 represents it) and measured ~2x faster than torch._int_mm on this AVX-512 machine
        return (a.float() @ b_t.float().t()).to(torch.int32)
    return torch._int_mm(a.contiguous(), b_t.t())


def _cuda_fallback(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    # int32 matmul is not implemented on CUDA; int8 values and their products are exact in fp64
    return (a.double() @ b_t.double().t()).round().to(torch.int32)


def w8a8_linear_impl(x2d, weight, weight_scale, bias=None, input_scale=None) -> torch.Tensor:
    if input_scale is None:
        xq, xs = quantize_int8_per_token(x2d)
    else:
        xq, xs = quantize_int8_static(x2d, input_scale), input_scale.float().reshape(1, 1)
    if not xq.is_cuda and xq.shape[1] * INT8_MAX * INT8_MAX < 2 ** 24:
        y = xq.float() @ weight.float().t()  # exact (see int8_mm), without the int32 round trip
    else:
        y = int8_mm(xq, weight).float()
    y.mul_(xs).mul_(weight_scale.float().reshape(1, -1))
    if bias is not None:
        y.add_(bias.float())
    return y.to(x2d.dtype)


def w8a8_linear_reference(x2d, weight, weight_scale, bias=None, input_scale=None) -> torch.Tensor:
    """The oracle: same quantization of x, exact int32 GEMM, fp64 epilogue; returns fp64."""
    if input_scale is None:
        xq, xs = quantize_int8_per_token(x2d)
    else:
        xq, xs = quantize_int8_static(x2d, input_scale), input_scale.float().reshape(1, 1)
    acc = int8_mm_reference(xq.cpu(), weight.cpu()).double()
    y = acc * xs.cpu().double() * weight_scale.cpu().double().reshape(1, -1)
    if bias is not None:
        y = y + bias.cpu().double()
    return y


@torch.library.custom_op("quantkern::w8a8_linear", mutates_args=())
def w8a8_linear(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``[M, K]`` activations x int8 ``[N, K]`` weight -> ``[M, N]`` in x's dtype (see module doc)."""
    return w8a8_linear_impl(x2d, weight, weight_scale, bias, input_scale)


@w8a8_linear.register_fake
def _(x2d, weight, weight_scale, bias=None, input_scale=None):
    return x2d.new_empty(x2d.shape[0], weight.shape[0])


def check_w8a8_args(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    """Clear early errors instead of a failure inside a GEMM."""
    if weight.dtype != torch.int8 or weight.dim() != 2:
        raise ValueError(f"W8A8 weight must be int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    if x2d.dim() != 2 or x2d.shape[1] != weight.shape[1]:
        raise ValueError(f"W8A8: input {tuple(x2d.shape)} does not match weight [N={weight.shape[0]}, "
                         f"K={weight.shape[1]}]")
    if x2d.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"W8A8: activations must be fp32/fp16/bf16, got {x2d.dtype}")
    if weight_scale.numel() != weight.shape[0]:
        raise ValueError(f"W8A8: weight_scale has {weight_scale.numel()} values for {weight.shape[0]} channels")


# -- FP8 E4M3 ---------------------------------------------------------------------------------------
def fp8_scaled_mm_ok(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """``torch._scaled_mm`` applies: CUDA with compute capability >= 8.9, K and N multiples of 16."""
    if not (x2d.is_cuda and hasattr(torch, "_scaled_mm")):
        return False
    n, k = weight.shape
    return torch.cuda.get_device_capability(x2d.device) >= (8, 9) and k % 16 == 0 and n % 16 == 0


def fp8_linear_impl(x2d, weight, weight_scale, bias=None, input_scale=None, act: str = "dynamic",
                    use_scaled_mm: bool = True) -> torch.Tensor:
    """``act``: ``"none"`` (weight-only: dequantize the fp8 weight to x's dtype), ``"dynamic"``
    (per-token fp8 activations) or ``"static"`` (per-tensor ``input_scale``)."""
    ws = weight_scale.float().reshape(-1, 1)
    if act == "none":
        w = (weight.float() * ws).to(x2d.dtype)  # scale in fp32: a tiny scale must not underflow in fp16
        y = x2d @ w.t()
        return y + bias.to(y.dtype) if bias is not None else y
    if act == "dynamic":
        xq, xs = quantize_fp8_per_row(x2d)
    else:
        xs = input_scale.float().reshape(1, 1).expand(x2d.shape[0], 1)
        xq = cast_to_fp8(x2d, xs)
    if use_scaled_mm and fp8_scaled_mm_ok(x2d, weight):
        # row-wise scales: scale_a [M, 1], scale_b [1, N]; b must be column-major (a transposed view)
        y = torch._scaled_mm(xq, weight.t(), scale_a=xs.contiguous(), scale_b=ws.reshape(1, -1).contiguous(),
                             out_dtype=torch.bfloat16).float()
    else:  # emulation: fp8 values are exact in fp32
        y = (xq.float() @ weight.float().t()) * xs * ws.reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x2d.dtype)


def fp8_linear_reference(x2d, weight, weight_scale, bias=None, input_scale=None, act: str = "dynamic"):
    """The fp64 oracle of :func:`fp8_linear_impl` (same activation casts)."""
    ws = weight_scale.cpu().double().reshape(1, -1)
    if act == "none":
        y = x2d.cpu().double() @ (weight.cpu().double() * ws.t()).t()
    else:
        if act == "dynamic":
            xq, xs = quantize_fp8_per_row(x2d)
        else:
            xs = input_scale.float().reshape(1, 1)
            xq = cast_to_fp8(x2d, xs)
        y = (xq.cpu().double() @ weight.cpu().double().t()) * xs.cpu().double() * ws
    return y + bias.cpu().double() if bias is not None else y


@torch.library.custom_op("quantkern::fp8_linear", mutates_args=())
def fp8_linear(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
               input_scale: torch.Tensor | None = None, act: str = "dynamic", use_scaled_mm: bool = True
               ) -> torch.Tensor:
    """``[M, K]`` activations x fp8 E4M3 ``[N, K]`` weight (scales ``[N, 1]``) -> ``[M, N]`` in x's dtype."""
    return fp8_linear_impl(x2d, weight, weight_scale, bias, input_scale, act, use_scaled_mm)


@fp8_linear.register_fake
def _(x2d, weight, weight_scale, bias=None, input_scale=None, act="dynamic", use_scaled_mm=True):
    return x2d.new_empty(x2d.shape[0], weight.shape[0])


# -- whole layers as single ops, for the reference kernels of the module family -------------------------
@torch.library.custom_op("quantkern::w8a8_linear_ref", mutates_args=())
def w8a8_linear_ref_op(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                       bias: torch.Tensor | None = None, input_scale: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`w8a8_linear_reference` (the fp64 oracle) returned in x's dtype on x's device."""
    y = w8a8_linear_reference(x2d, weight, weight_scale, bias, input_scale)
    return y.to(device=x2d.device, dtype=x2d.dtype)


@w8a8_linear_ref_op.register_fake
def _(x2d, weight, weight_scale, bias=None, input_scale=None):
    return x2d.new_empty(x2d.shape[0], weight.shape[0])


def zeroquant_weight(weight, weight_scale, weight_zero_point, g_idx) -> torch.Tensor:
    """fp32 ``[N, K]`` from ZeroQuant codes (signed or unsigned), group scales and optional zero points."""
    z = weight_zero_point.float()[:, g_idx] if weight_zero_point is not None else 0.0
    return (weight.float() - z) * weight_scale[:, g_idx]


@torch.library.custom_op("quantkern::zeroquant_linear_ref", mutates_args=())
def zeroquant_linear_ref(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                         weight_zero_point: torch.Tensor | None, g_idx: torch.Tensor, input_scale: torch.Tensor | None,
                         input_zero_point: torch.Tensor | None, bias: torch.Tensor | None, a_bits: int,
                         a_has_zero: bool, a_unsign: bool) -> torch.Tensor:
    """A ZeroQuant Linear: fake-quantized activations (per token, or the static range) times the
    dequantized weight, in fp32; the result in x's dtype."""
    x = x2d.float()
    if input_scale is None:
        q, s, z = quantize_rows(x, a_bits, a_has_zero, a_unsign)
    else:
        s = input_scale.reshape(1, 1)
        z = input_zero_point.reshape(1, 1) if input_zero_point is not None else torch.zeros_like(s)
        q = quantize_with(x, s, z, a_bits, a_unsign)
    y = dequantize_codes(q, s, z) @ zeroquant_weight(weight, weight_scale, weight_zero_point, g_idx).t()
    if bias is not None:
        y = y + bias.float()
    return y.to(x2d.dtype)


@zeroquant_linear_ref.register_fake
def _(x2d, weight, weight_scale, weight_zero_point, g_idx, input_scale, input_zero_point, bias, a_bits, a_has_zero,
      a_unsign):
    return x2d.new_empty(x2d.shape[0], weight.shape[0])
