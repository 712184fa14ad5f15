"""``FP8Linear``: fp8 E4M3 weights with per-output-channel scales; activations kept in x's dtype
(weight-only), cast to fp8 per token (dynamic) or with one calibrated per-tensor scale (static).

State dict (compressed-tensors "float-quantized" style): ``weight`` float8_e4m3fn ``[N, K]``,
``weight_scale`` fp32 ``[N, 1]``, ``input_scale`` fp32 ``[1]`` (static only), ``bias`` ``[N]``.
``forward`` is one ``quantkern::fp8_linear`` op call: ``torch._scaled_mm`` on GPUs with fp8 tensor
cores (sm89+, K and N multiples of 16), exact fp32 emulation elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.fp8 import FP8_DTYPE, quantize_fp8_per_row
from ..kernels.registry import check_same_device
from ..kernels.w8a8 import fp8_linear, fp8_scaled_mm_ok

ACT_MODES = ("none", "dynamic", "static")
BACKENDS = ("auto", "scaled_mm", "emulated")


class FP8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, act: str = "dynamic",
                 dtype: torch.dtype = torch.float16, device=None):
        super().__init__()
        if act not in ACT_MODES:
            raise ValueError(f"act must be one of {list(ACT_MODES)}, got {act!r}")
        self.in_features, self.out_features, self.act = in_features, out_features, act
        self.name, self.backend = "", "auto"
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("input_scale",
                             torch.ones(1, dtype=torch.float32, device=device) if act == "static" else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act: str = "dynamic", input_scale: float | None = None) -> "FP8Linear":
        """Quantize ``linear``'s weight (per channel); ``act="static"`` needs ``input_scale`` > 0."""
        w = linear.weight.detach()
        q, s = quantize_fp8_per_row(w)
        return cls.from_fp8(q, s, bias=linear.bias, act=act, input_scale=input_scale, dtype=w.dtype)

    @classmethod
    def from_fp8(cls, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None,
                 act: str = "dynamic", input_scale: float | None = None,
                 dtype: torch.dtype = torch.float16) -> "FP8Linear":
        """Wrap already quantized tensors: ``weight`` float8_e4m3fn ``[N, K]``, ``weight_scale`` ``[N, 1]``
        (finite, > 0); ``act="static"`` needs ``input_scale`` > 0."""
        if weight.dtype != FP8_DTYPE or weight.dim() != 2:
            raise ValueError(f"weight must be a 2-D {FP8_DTYPE} tensor, got {weight.dtype} {tuple(weight.shape)}")
        n, k = weight.shape
        if tuple(weight_scale.shape) != (n, 1) or not bool(torch.isfinite(weight_scale).all() and (weight_scale > 0).all()):
            raise ValueError(f"weight_scale must be finite, positive and of shape ({n}, 1), got {tuple(weight_scale.shape)}")
        mod = cls(k, n, bias=bias is not None, act=act, dtype=dtype, device=weight.device)
        mod.weight.copy_(weight)
        mod.weight_scale.copy_(weight_scale)
        if act == "static":
            if input_scale is None or not (input_scale > 0 and input_scale < float("inf")):
                raise ValueError(f"act='static' needs a finite input_scale > 0, got {input_scale!r}")
            mod.input_scale.fill_(float(input_scale))
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight.float() * self.weight_scale

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight=fp8_e4m3 per-channel, activations={self.act}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FP8Linear: input has {x.shape[-1]} features, expected {self.in_features}")
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"FP8Linear: activations must be fp32/fp16/bf16, got {x.dtype}")
        check_same_device(self, x, self._buffers.items())
        x2 = x.reshape(-1, self.in_features).contiguous()
        if self.backend == "scaled_mm" and self.act != "none" and not fp8_scaled_mm_ok(x2, self.weight):
            raise RuntimeError("backend='scaled_mm' needs a CUDA GPU with compute capability >= 8.9 and "
                               f"in/out features multiples of 16 (got {self.in_features}->{self.out_features}, "
                               f"device {x.device})")
        y = fp8_linear(x2, self.weight, self.weight_scale, self.bias, self.input_scale, self.act,
                       self.backend != "emulated")
        return y.reshape(*x.shape[:-1], self.out_features)
