"""FP8 E4M3 codec: per-row scales and the clamped cast (weights per output channel, activations per
token or per tensor). The fp8 GEMM that consumes these codes lives in :mod:`quantkern.kernels.w8a8`.
"""

from __future__ import annotations

import torch

# Casting a value beyond ±448 to float8_e4m3fn gives NaN, so every cast below clamps to the E4M3 range
# first: finite input never becomes NaN. Scales are fp32; all-zero rows get scale 1.
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448


def cast_to_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``clamp(x / scale, ±448)`` as ``float8_e4m3fn`` (``scale`` broadcastable to ``x``)."""
    return (x.float() / scale.float()).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_fp8_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [R, C]`` -> ``(fp8 [R, C], scale fp32 [R, 1])``: per output channel for weights, per token
    (dynamic) for activations. Raises ``ValueError`` for non-finite input."""
    amax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    if not torch.isfinite(amax).all():
        raise ValueError("FP8: values contain inf/NaN; cannot compute scales")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    return cast_to_fp8(x, scale), scale
