"""``PTQQuantizer``: static activation scales from observers (min-max, moving average, percentile, MSE).

``prepare`` installs one observer per target Linear input (see :mod:`quantkern.algorithms.observers`);
calibration forwards (full-model, padding excluded) fill them; ``convert`` freezes each range into a
static per-tensor ``input_scale`` and swaps in W8A8 int8 or FP8 Linears.
"""

from __future__ import annotations

import torch
from torch import nn

from ..algorithms.observers import make_observer
from ..core.fp8 import FP8_MAX
from ..core.int8 import INT8_MAX
from ..core.qparams import static_input_scale
from ..nn.fp8_linear import FP8Linear
from ..nn.w8a8_linear import W8A8Linear
from .configs import PTQConfig
from .registry import register_quantizer
from .smoothquant import W8A8Quantizer


@register_quantizer(PTQConfig)
class PTQQuantizer(W8A8Quantizer):
    """``PTQQuantizer(model, observer="percentile", percentile=99.9).quantize(data)``."""

    needs_data = True

    @property
    def produces(self) -> str:
        return "W8A8Linear" if self.config.weight_dtype == "int8" else "FP8Linear"

    def new_observer(self, name: str):
        c = self.config.for_layer(name)
        kwargs = {"percentile": dict(percentile=c.percentile),
                  "moving_average": dict(averaging_constant=c.averaging_constant),
                  "mse": dict(fp8=c.act_dtype != "int8")}.get(c.observer, {})
        return make_observer(c.observer, **kwargs)

    def make_module(self, lin: nn.Linear, act_amax: torch.Tensor | None, name: str = "", observer=None
                    ) -> nn.Module:
        if self.config.weight_dtype == "int8":
            return W8A8Linear.from_linear(lin, input_scale=static_input_scale(act_amax, INT8_MAX))
        return FP8Linear.from_linear(lin, act="static", input_scale=static_input_scale(act_amax, FP8_MAX))
