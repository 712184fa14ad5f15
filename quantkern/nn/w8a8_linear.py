"""``W8A8Linear``: int8 per-channel weights x int8 activations (per-token dynamic or static per-tensor).

State dict (self-describing, compressed-tensors style): ``weight`` int8 ``[N, K]``, ``weight_scale``
fp32 ``[N, 1]``, ``input_scale`` fp32 ``[1]`` (static activations only), ``bias`` ``[N]`` (optional).
``forward`` is one op call plus reshapes: ``quantkern::w8a8_linear`` (``torch._int_mm``, the ``auto``
choice; backend ``int_mm``), ``quantkern::w8a8_linear_triton`` (``triton``) or the fp64 oracle
``quantkern::w8a8_linear_ref`` (``reference``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..core import WeightScheme
from ..core.int8 import qparams_from_range, quantize_int8_per_channel, quantize_weight_groups
from ..core.spec import ActivationScheme
from ..kernels.registry import KernelSpec, WeightTensors
from ..kernels.w8a8 import check_w8a8_args, zeroquant_weight
from .base import QuantModule


class W8A8Linear(QuantModule):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, static: bool = False,
                 dtype: torch.dtype = torch.float16, device=None, backend="auto"):
        super().__init__(backend)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device) if static else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(WeightScheme(8, -1, True), self.in_features, self.out_features, self.weight_scale.dtype,
                          self.bias is not None, "w8a8", ActivationScheme("int", 8, static=self.input_scale is not None))

    def weight_tensors(self) -> WeightTensors:
        return WeightTensors(self.kernel_spec(), self.name, weight=self.weight, weight_scale=self.weight_scale,
                             input_scale=self.input_scale, bias=self.bias)

    def check_input(self, x: torch.Tensor) -> None:
        check_w8a8_args(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale)

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


class ZeroQuantLinear(QuantModule):
    """ZeroQuant-style Linear: group-wise int weights and token-wise (or static per-tensor) int activations.

    State dict: ``weight`` int8 (signed codes) or uint8 (``w_unsign``) ``[N, K]``, ``weight_scale``
    fp32 ``[N, G]``, ``weight_zero_point`` (same dtype as ``weight``, ``[N, G]``; only with
    ``w_has_zero``), ``input_scale`` fp32 ``[1]`` and ``input_zero_point`` int32 ``[1]`` (static
    activations; the zero point only with ``a_has_zero``), ``bias``. The forward is the pure-PyTorch
    reference (fake-quantized activations times the dequantized weight in fp32); there is no fused
    kernel for these layouts yet (the one op ``quantkern::zeroquant_linear_ref``).
    """

    def __init__(self, in_features, out_features, w_bits=8, group_size=64, w_has_zero=False, w_unsign=False,
                 a_bits=8, a_has_zero=False, a_unsign=False, static=False, bias=False, dtype=torch.float16,
                 device=None, backend="auto"):
        super().__init__(backend)
        self.in_features, self.out_features = in_features, out_features
        self.w_bits, self.group_size, self.w_has_zero, self.w_unsign = w_bits, group_size, w_has_zero, w_unsign
        self.a_bits, self.a_has_zero, self.a_unsign = a_bits, a_has_zero, a_unsign
        gs = in_features if group_size == -1 else group_size
        g = -(-in_features // gs)
        wdt = torch.uint8 if w_unsign else torch.int8
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=wdt, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, g, dtype=torch.float32, device=device))
        self.register_buffer("weight_zero_point",
                             torch.zeros(out_features, g, dtype=wdt, device=device) if w_has_zero else None)
        self.register_buffer("input_scale", torch.ones(1, dtype=torch.float32, device=device) if static else None)
        self.register_buffer("input_zero_point", torch.zeros(1, dtype=torch.int32, device=device)
                             if static and a_has_zero else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("g_idx", torch.arange(in_features, device=device) // gs, persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_range: tuple[float, float] | None = None, **scheme):
        """``scheme``: the constructor's quantization keywords; ``act_range`` (lo, hi) makes activations static."""
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, static=act_range is not None,
                  bias=linear.bias is not None, dtype=w.dtype, device=w.device, **scheme)
        codes, s, z = quantize_weight_groups(w, mod.w_bits, mod.group_size, mod.w_has_zero, mod.w_unsign)
        mod.weight.copy_(codes.to(mod.weight.dtype))
        mod.weight_scale.copy_(s)
        if mod.w_has_zero:
            mod.weight_zero_point.copy_(z.to(mod.weight.dtype))
        if act_range is not None:
            lo, hi = (torch.tensor([float(v)]) for v in act_range)
            s, z = qparams_from_range(lo, hi, mod.a_bits, mod.a_has_zero, mod.a_unsign)
            mod.input_scale.copy_(s)
            if mod.a_has_zero:
                mod.input_zero_point.copy_(z)
        if linear.bias is not None:
            mod.bias.copy_(linear.bias.detach())
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        return zeroquant_weight(self.weight, self.weight_scale, self.weight_zero_point, self.g_idx)

    def kernel_spec(self) -> KernelSpec:
        act = ActivationScheme("int", self.a_bits, static=self.input_scale is not None, has_zero=self.a_has_zero,
                               unsign=self.a_unsign)
        return KernelSpec(WeightScheme(self.w_bits, self.group_size, not self.w_has_zero), self.in_features,
                          self.out_features, self.weight_scale.dtype, self.bias is not None, "zeroquant", act)

    def weight_tensors(self) -> WeightTensors:
        return WeightTensors(self.kernel_spec(), self.name, weight=self.weight, weight_scale=self.weight_scale,
                             weight_zero_point=self.weight_zero_point, g_idx=self.g_idx,
                             input_scale=self.input_scale, input_zero_point=self.input_zero_point, bias=self.bias)

    def extra_repr(self) -> str:
        act = "static" if self.input_scale is not None else "per-token"
        return (f"in_features={self.in_features}, out_features={self.out_features}, w_bits={self.w_bits}, "
                f"group_size={self.group_size}, w_has_zero={self.w_has_zero}, w_unsign={self.w_unsign}, "
                f"a_bits={self.a_bits} {act}, a_has_zero={self.a_has_zero}, a_unsign={self.a_unsign}")
