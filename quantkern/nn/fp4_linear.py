"""FP4 (E2M1) weight-only Linear with group scales (the E2M1 codec and the nibble packing live in
:mod:`quantkern.core.fp4`).

Two codes per byte along K, the even column in the low nibble (an odd K is padded with a zero code).
State dict: ``weight_packed`` uint8 ``[N, ceil(K/2)]``, ``weight_scale`` ``[N, G]`` (group
scales, G = ceil(K/group_size); fp16 / bf16 / fp32 / fp8 E4M3), ``bias`` ``[N]``.
``W[n, k] = e2m1(code[n, k]) · weight_scale[n, k // group_size]``.

The forward is the pure-PyTorch reference, one ``quantkern::fp4_linear_ref`` op (decode through a
16-entry table, then a dense GEMM in x's dtype); E2M1 is not a uniform grid, so the integer WnA16
kernels cannot run it as-is.
"""

from __future__ import annotations

import torch

from ..core.fp4 import pack_nibbles
from ..core.qparams import ScaleOverflowError
from ..core.spec import FloatWeightScheme
from ..kernels.fp4 import fp4_weight
from ..kernels.registry import KernelSpec, WeightTensors
from .base import QuantModule

SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
                "float8_e4m3fn": torch.float8_e4m3fn}


class FP4Linear(QuantModule):
    def __init__(self, in_features: int, out_features: int, group_size: int = 32, bias: bool = False,
                 scale_dtype: torch.dtype = torch.float16, dtype: torch.dtype = torch.float16, device=None,
                 backend="auto"):
        if not (group_size == -1 or (isinstance(group_size, int) and group_size > 0)):
            raise ValueError(f"group_size must be -1 or a positive int, got {group_size!r}")
        super().__init__(backend)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        gs = in_features if group_size == -1 else group_size
        self.register_buffer("weight_packed", torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8,
                                                          device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, -(-in_features // gs), device=device)
                             .to(scale_dtype))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scales: torch.Tensor, group_size: int, bias: torch.Tensor | None = None,
                   dtype: torch.dtype = torch.float16) -> "FP4Linear":
        """``codes`` uint8 ``[N, K]`` (E2M1), ``scales`` ``[N, G]`` in the storage dtype. Raises
        :class:`~quantkern.core.ScaleOverflowError` for scales that are not finite (an fp16 scale
        overflows for |w| > 6 * 65504)."""
        if not bool(torch.isfinite(scales.float()).all()):
            raise ScaleOverflowError(f"FP4Linear: the {str(scales.dtype).replace('torch.', '')} group scales are not "
                                     "finite (overflowed?); quantize with scale_dtype='float32'")
        n, k = codes.shape
        mod = cls(k, n, group_size, bias=bias is not None, scale_dtype=scales.dtype, dtype=dtype,
                  device=codes.device)
        if scales.shape != mod.weight_scale.shape:
            raise ValueError(f"scales shape {tuple(scales.shape)} != expected {tuple(mod.weight_scale.shape)}")
        mod.weight_packed.copy_(pack_nibbles(codes))
        mod.weight_scale.copy_(scales)
        if bias is not None:
            mod.bias.copy_(bias.detach())
        return mod

    def dequantized_weight(self) -> torch.Tensor:
        """fp32 ``[N, K]``."""
        return fp4_weight(self.weight_packed, self.weight_scale, self.in_features, self.group_size)

    def kernel_spec(self) -> KernelSpec:
        return KernelSpec(FloatWeightScheme("fp4_e2m1", self.group_size), self.in_features, self.out_features,
                          self.weight_scale.dtype, self.bias is not None, "fp4")

    def weight_tensors(self) -> WeightTensors:
        return WeightTensors(self.kernel_spec(), self.name, weight_packed=self.weight_packed,
                             weight_scale=self.weight_scale, bias=self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, weight=fp4 e2m1, "
                f"group_size={self.group_size}, scale_dtype={self.weight_scale.dtype}, bias={self.bias is not None}")
