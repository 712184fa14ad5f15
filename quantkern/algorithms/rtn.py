"""Round-to-nearest: per-group min/max quantization with no data."""

from __future__ import annotations

import torch

from ..core import QuantizedWeight, WeightScheme, find_qparams, find_qparams_mse, quantize


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    """int32 ``[in_features]`` group of each column; the last group is ragged if needed."""
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // gs).to(torch.int32)


def quantize_rtn(weight: torch.Tensor, scheme: WeightScheme, scale_dtype: torch.dtype = torch.float16,
                 mse: bool = False) -> QuantizedWeight:
    """Quantize ``weight`` ([out_features, in_features]) group by group with min/max (or MSE-clipped) ranges."""
    if scheme.act_order:
        raise ValueError("act-order needs calibration statistics; RTN does not support it")
    w = weight.detach().float()
    n, k = w.shape
    gs = k if scheme.group_size == -1 else scheme.group_size
    find = find_qparams_mse if mse else find_qparams
    codes = torch.empty(n, k, dtype=torch.int32, device=w.device)
    scales, zeros = [], []
    for start in range(0, k, gs):
        cols = w[:, start:start + gs]
        s, z = find(cols, scheme.bits, scheme.sym, scale_dtype)
        codes[:, start:start + gs] = quantize(cols, s, z, scheme.maxq)
        scales.append(s)
        zeros.append(z)
    return QuantizedWeight(codes=codes, scales=torch.stack(scales).to(scale_dtype), zeros=torch.stack(zeros),
                           g_idx=group_index(k, scheme.group_size).to(w.device), scheme=scheme)
