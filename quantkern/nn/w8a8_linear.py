"""``W8A8Linear``: int8 per-channel weights x int8 activations (per-token dynamic or static per-tensor).

State dict (self-describing, compressed-tensors style): ``weight`` int8 ``[N, K]``, ``weight_scale``
fp32 ``[N, 1]``, ``input_scale`` fp32 ``[1]`` (static activations only), ``bias`` ``[N]`` (optional).
``forward`` is one ``quantkern::w8a8_linear`` op call plus reshapes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..kernels.w8a8 import check_w8a8_args, quantize_int8_per_channel, w8a8_linear, w8a8_linear_reference


class W8A8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, static: bool = False,
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.name = ""
        self.backend = "auto"  # "auto" | "int_mm" | "reference" (the fp64 oracle, for checks)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device) if static else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, input_scale: torch.Tensor | float | None = None) -> "W8A8Linear":
        """Quantize ``linear``'s weight per output channel; ``input_scale`` (> 0) makes activations static."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                  static=input_scale is not None, dtype=w.dtype if w.is_floating_point() else torch.float16,
                  device=w.device)
        q, s = quantize_int8_per_channel(w)
        mod.weight.copy_(q)
        mod.weight_scale.copy_(s)
        if input_scale is not None:
            input_scale = torch.as_tensor(input_scale, dtype=torch.float32).reshape(1)
            if not (torch.isfinite(input_scale).all() and input_scale.item() > 0):
                raise ValueError(f"input_scale must be finite and > 0, got {input_scale.item()}")
            mod.input_scale.copy_(input_scale)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale

    def extra_repr(self) -> str:
        act = "static per-tensor" if self.input_scale is not None else "dynamic per-token"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"activations=int8 {act}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        check_w8a8_args(x2, self.weight, self.weight_scale)
        if self.backend == "reference":
            y = w8a8_linear_reference(x2, self.weight, self.weight_scale, self.bias, self.input_scale)
            y = y.to(device=x.device, dtype=x.dtype)
        else:
            if self.backend == "int_mm" and not hasattr(torch, "_int_mm"):
                raise RuntimeError("backend='int_mm' but this torch has no torch._int_mm")
            y = w8a8_linear(x2.contiguous(), self.weight, self.weight_scale, self.bias, self.input_scale)
        return y.reshape(*x.shape[:-1], self.out_features)
