"""``ZeroQuantQuantizer``: group-wise int weights x token-wise int activations (ZeroQuant-style).

Data-free with dynamic activations; with ``act_static=True`` a min-max observer on each target
Linear's input (full-model calibration forwards, padding excluded) fixes a per-tensor range.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algorithms.observers import MinMaxObserver
from ..nn.w8a8_linear import ZeroQuantLinear
from .configs import ZeroQuantConfig
from .registry import register_quantizer
from .smoothquant import W8A8Quantizer


@register_quantizer(ZeroQuantConfig)
class ZeroQuantQuantizer(W8A8Quantizer):
    """``ZeroQuantQuantizer(model, w_bits=4, w_group_size=64, a_bits=8, ...).quantize(data=None)``."""

    produces = "ZeroQuantLinear"

    def new_observer(self, name: str):
        return MinMaxObserver()

    def plan_blocks(self) -> None:
        super().plan_blocks()
        for name, lin in self.plan.quantize.items():
            g = self.config.for_layer(name).w_group_size
            if g != -1 and g > lin.in_features:
                raise ValueError(f"w_group_size={g} > in_features={lin.in_features} of {name}")

    def make_module(self, lin: nn.Linear, act_amax: torch.Tensor | None, name: str = "", observer=None
                    ) -> nn.Module:
        c = self.config.for_layer(name)
        act_range = None
        if c.act_static:
            act_range = observer.range() if observer is not None and observer.count else (0.0, 0.0)
        return ZeroQuantLinear.from_linear(lin, act_range=act_range, **c.scheme_kwargs())
