"""The canonical plain form every weight quantizer returns and every layout packs from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scheme import WeightScheme


@dataclass
class QuantizedWeight:
    """Integer codes plus group parameters of one Linear weight.

    - ``codes``: int32 ``[out_features, in_features]``, values in ``[0, 2**bits - 1]``
    - ``scales``: ``[num_groups, out_features]`` (fp16 / bf16 / fp32)
    - ``zeros``: int32 ``[num_groups, out_features]``, values in ``[0, 2**bits - 1]`` (stored as-is:
      ``w = (q - zero) * scale``, the GPTQ "v2" convention)
    - ``g_idx``: int32 ``[in_features]``, the group of each input column (non-monotonic with act-order)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    scheme: WeightScheme

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight this represents, ``[out_features, in_features]``."""
        g = self.g_idx.long()
        s = self.scales.float()[g].t()  # [N, K]
        z = self.zeros.float()[g].t()
        return ((self.codes.float() - z) * s).to(dtype)

    def validate(self) -> None:
        """Raise ``ValueError`` if shapes / ranges are inconsistent (cheap; run before packing)."""
        n, k = self.codes.shape
        g = self.scheme.num_groups(k) if not self.scheme.act_order or self.scheme.group_size == -1 else None
        maxq = self.scheme.maxq
        if self.scales.shape != self.zeros.shape or self.scales.shape[1] != n:
            raise ValueError(f"scales {tuple(self.scales.shape)} / zeros {tuple(self.zeros.shape)} do not match out_features={n}")
        if g is not None and self.scales.shape[0] != g:
            raise ValueError(f"expected {g} groups, got scales with {self.scales.shape[0]}")
        if self.g_idx.shape != (k,):
            raise ValueError(f"g_idx must have shape ({k},), got {tuple(self.g_idx.shape)}")
        if int(self.codes.min()) < 0 or int(self.codes.max()) > maxq:
            raise ValueError(f"codes outside [0, {maxq}]")
        if int(self.zeros.min()) < 0 or int(self.zeros.max()) > maxq:
            raise ValueError(f"zeros outside [0, {maxq}]")
        if int(self.g_idx.min()) < 0 or int(self.g_idx.max()) >= self.scales.shape[0]:
            raise ValueError("g_idx points outside the groups")
