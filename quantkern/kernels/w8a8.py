"""W8A8 int8: per-output-channel int8 weights x int8 activations (per-token dynamic or per-tensor static).

``y[m, n] = (Σ_k xq[m, k] · wq[n, k]) · x_scale[m] · w_scale[n] + bias[n]`` with int32 accumulation.

Layouts: ``weight`` int8 ``[N, K]`` (``nn.Linear`` layout, symmetric, codes in [-127, 127]),
``weight_scale`` fp32 ``[N, 1]``, ``input_scale`` fp32 ``[1]`` (static) or None (dynamic per token),
``bias`` ``[N]`` or None. Activations ``x2d`` ``[M, K]`` fp32 / fp16 / bf16; the output has x's dtype.

Paths for the int8 GEMM (``int8_mm``): ``torch._int_mm`` (cuBLASLt int8 on CUDA; oneDNN on CPU), with
CUDA's constraints handled here (M > 16 is needed: small M is zero-padded; K and N must be multiples
of 8, otherwise an exact fp64 product runs, since int32 matmul is CPU-only). The whole layer is the ``quantkern::w8a8_linear``
custom op (with a fake implementation for tracing); :func:`w8a8_linear_reference` is its fp64 oracle.
"""

from __future__ import annotations

import torch

INT8_MAX = 127


def quantize_int8_per_token(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic per-row quantization: returns ``(q int8 [M, K], scale fp32 [M, 1])``.
    All-zero rows get scale 1 (codes 0); non-finite input raises ``ValueError``."""
    x = x2d.float()
    amax = x.abs().amax(dim=-1, keepdim=True)
    if not torch.isfinite(amax).all():
        raise ValueError("W8A8: activations contain inf/NaN; cannot compute per-token scales")
    scale = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    return torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_int8_static(x2d: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor static quantization with a calibrated ``input_scale`` (values beyond saturate)."""
    return torch.round(x2d.float() / input_scale.float()).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)


def quantize_int8_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight [N, K]`` -> ``(int8 [N, K], scale fp32 [N, 1])``, symmetric per output channel."""
    return quantize_int8_per_token(weight)


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
    return torch._int_mm(a.contiguous(), b_t.t())


def _cuda_fallback(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    # int32 matmul is not implemented on CUDA; int8 values and their products are exact in fp64
    return (a.double() @ b_t.double().t()).round().to(torch.int32)


def w8a8_linear_impl(x2d, weight, weight_scale, bias=None, input_scale=None) -> torch.Tensor:
    if input_scale is None:
        xq, xs = quantize_int8_per_token(x2d)
    else:
        xq, xs = quantize_int8_static(x2d, input_scale), input_scale.float().reshape(1, 1)
    acc = int8_mm(xq, weight)
    y = acc.float() * xs * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
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
