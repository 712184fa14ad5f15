"""SmoothQuant (Xiao et al., 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization for
Large Language Models"): migrate activation outliers into the weights before W8A8.

For Linears that share an input ``X [T, K]`` (stacked weight ``W [N, K]``), the per-input-channel
smoothing factor is ``s_j = max|X_j|^α / max|W_j|^(1-α)``; ``X·diag(s)^-1`` is folded into the
producing norm (see :mod:`quantkern.algorithms.awq` for the fold helpers) and ``W·diag(s)`` into the
Linears. ``α = 0`` leaves activations as they are, ``α = 1`` moves all of their range into weights.
"""

from __future__ import annotations

import torch


def smoothing_factors(act_amax: torch.Tensor, weight: torch.Tensor, alpha: float, eps: float = 1e-5) -> torch.Tensor:
    """``s [K]`` fp32 from per-channel activation abs-max ``act_amax [K]`` and ``weight [N, K]``.

    Channels never activated (amax 0) or with all-zero weights get ``s = 1``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_amax.float()
    w = weight.detach().float().abs().amax(dim=0)
    if a.shape != w.shape:
        raise ValueError(f"act_amax has {a.numel()} channels, weight has {w.numel()} input channels")
    s = a.clamp(min=eps).pow(alpha) / w.clamp(min=eps).pow(1 - alpha)
    dead = (a <= 0) | (w <= 0) | ~torch.isfinite(s)
    return torch.where(dead, torch.ones_like(s), s.clamp(min=eps))
