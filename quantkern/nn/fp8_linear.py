"""``FP8Linear``: fp8 E4M3 weights with per-output-channel scales; activations kept in x's dtype
(weight-only), cast to fp8 per token (dynamic) or with one calibrated per-tensor scale (static).

State dict (compressed-tensors "float-quantized" style): ``weight`` float8_e4m3fn ``[N, K]``,
``weight_scale`` fp32 ``[N, 1]``, ``input_scale`` fp32 ``[1]`` (static only), ``bias`` ``[N]``.
``forward`` is one ``quantkern::fp8_linear`` op call: ``torch._scaled_mm`` on GPUs with fp8 tensor
cores (sm89+, K and N multiples of 16; backend ``scaled_mm``), exact fp32 emulation elsewhere (backend
``reference``, also called ``emulated``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core.fp8 import FP8_DTYPE, quantize_fp8_per_row
from ..core.spec import ActivationScheme, FloatWeightScheme
from ..kernels.registry import KernelSpec, WeightTensors
from .base import QuantModule

ACT_MODES = ("none", "dynamic", "static")
BACKENDS = ("auto", "scaled_mm", "emulated")


class FP8Linear(QuantModule):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, act: str = "dynamic",
                 dtype: torch.dtype = torch.float16, device=None, backend="auto"):
        if act not in ACT_MODES:
            raise ValueError(f"act must be one of {list(ACT_MODES)}, got {act!r}")
        super().__init__(backend)
        self.in_features, self.out_features, self.act = in_features, out_features, act
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

    def kernel_spec(self) -> KernelSpec:
        act = None if self.act == "none" else ActivationScheme("fp8_e4m3", 8, static=self.act == "static")
        return KernelSpec(FloatWeightScheme("fp8_e4m3"), self.in_features, self.out_features, self.weight_scale.dtype,
                          self.bias is not None, "fp8", act)

    def weight_tensors(self) -> WeightTensors:
        return WeightTensors(self.kernel_spec(), self.name, weight=self.weight, weight_scale=self.weight_scale,
                             input_scale=self.input_scale, bias=self.bias)
