"""FP4 (E2M1) weight-only Linear as one op: decode through the 16-entry table, then a dense GEMM in
x's dtype (E2M1 is not a uniform grid: the integer WnA16 kernels cannot run it as-is)."""

from __future__ import annotations

import torch

from ..core.fp4 import e2m1_table, unpack_nibbles


def fp4_weight(weight_packed: torch.Tensor, weight_scale: torch.Tensor, in_features: int, group_size: int
               ) -> torch.Tensor:
    """fp32 ``[N, K]``: ``e2m1(code[n, k]) * weight_scale[n, k // group_size]``."""
    codes = unpack_nibbles(weight_packed, in_features).long()
    gs = in_features if group_size == -1 else group_size
    g_idx = torch.arange(in_features, device=codes.device) // gs
    return e2m1_table(codes.device)[codes] * weight_scale.float()[:, g_idx]


@torch.library.custom_op("quantkern::fp4_linear_ref", mutates_args=())
def fp4_linear_ref(x2d: torch.Tensor, weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                   bias: torch.Tensor | None, group_size: int) -> torch.Tensor:
    w = fp4_weight(weight_packed, weight_scale, x2d.shape[1], group_size).to(x2d.dtype)
    return torch.nn.functional.linear(x2d, w, None if bias is None else bias.to(x2d.dtype))


@fp4_linear_ref.register_fake
def _(x2d, weight_packed, weight_scale, bias, group_size):
    return x2d.new_empty(x2d.shape[0], weight_packed.shape[0])
