"""Integer codecs for activations and weights: symmetric int8 (W8A8) and ZeroQuant-style integer ranges.

int8 (W8A8): symmetric, codes in [-127, 127] (``INT8_MAX``), fp32 scales; per token (dynamic) or per
tensor (static, a calibrated ``input_scale``) for activations ``[M, K]``, per output channel for
weights ``[N, K]``. The GEMMs that consume these codes live in :mod:`quantkern.kernels.w8a8`.
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


# -- ZeroQuant-style integer ranges ------------------------------------------------------------------
# ZeroQuant-style integer quantization (Yao et al., 2022, "ZeroQuant: Efficient and Affordable
# Post-Training Quantization for Large-Scale Transformers"): group-wise weights, token-wise activations.
#
# One function family covers the four range conventions named as in DeepSpeed's compression configs:
# ``unsign`` selects the code range ``[0, 2^b − 1]`` instead of ``[−2^(b−1), 2^(b−1) − 1]``;
# ``has_zero`` adds an integer zero point (asymmetric: ``x ≈ (q − z)·s``), otherwise ``x ≈ q·s``
# (symmetric; an unsigned range without a zero point can only hold non-negative values, so negatives
# saturate at 0 — meant for post-ReLU inputs). Rows are quantized independently (a weight row-group or
# an activation token); ``x [R, C]`` -> codes int32 ``[R, C]``, scale fp32 ``[R, 1]``, zero int32 ``[R, 1]``.


def code_range(bits: int, unsign: bool) -> tuple[int, int]:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return (0, (1 << bits) - 1) if unsign else (-(1 << (bits - 1)), (1 << (bits - 1)) - 1)


def qparams_from_range(lo: torch.Tensor, hi: torch.Tensor, bits: int, has_zero: bool, unsign: bool
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for ranges ``[lo, hi]`` (tensors of equal shape, fp32)."""
    qmin, qmax = code_range(bits, unsign)
    lo, hi = lo.float().clamp(max=0), hi.float().clamp(min=0)
    if has_zero:
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    else:
        amax = hi if unsign else torch.maximum(-lo, hi)
        scale = amax / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.zeros_like(scale)
    return scale, zero.to(torch.int32)


def quantize_rows(x: torch.Tensor, bits: int, has_zero: bool, unsign: bool):
    """Per-row dynamic quantization: ``(codes int32, scale [R, 1], zero int32 [R, 1])``."""
    x = x.float()
    if not torch.isfinite(x).all():
        raise ValueError("ZeroQuant: input contains inf/NaN")
    scale, zero = qparams_from_range(x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True), bits, has_zero,
                                     unsign)
    return quantize_with(x, scale, zero, bits, unsign), scale, zero


def quantize_with(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, unsign: bool) -> torch.Tensor:
    qmin, qmax = code_range(bits, unsign)
    return (torch.round(x.float() / scale) + zero).clamp_(qmin, qmax).to(torch.int32)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q.float() - zero.float()) * scale


def quantize_weight_groups(w: torch.Tensor, bits: int, group_size: int, has_zero: bool, unsign: bool):
    """``w [N, K]`` -> ``(codes int32 [N, K], scale fp32 [N, G], zero int32 [N, G])``; groups of
    ``group_size`` columns (``-1``: one per row; the last group may be ragged)."""
    n, k = w.shape
    gs = k if group_size == -1 else group_size
    codes = torch.empty(n, k, dtype=torch.int32, device=w.device)
    scales, zeros = [], []
    for start in range(0, k, gs):
        q, s, z = quantize_rows(w[:, start:start + gs], bits, has_zero, unsign)
        codes[:, start:start + gs] = q
        scales.append(s)
        zeros.append(z)
    return codes, torch.cat(scales, dim=1), torch.cat(zeros, dim=1)
