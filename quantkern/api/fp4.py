"""``FP4Quantizer``: FP4 (E2M1) weight-only quantization with group scales (data-free).

(The fp8 quantizer shares the W8A8 calibration plumbing and lives in :mod:`quantkern.api.smoothquant`.)
"""

from __future__ import annotations

from tqdm.auto import tqdm

from ..algorithms.fp4 import quantize_fp4_groups
from ..calibration import find_decoder_blocks
from ..nn.fp4_linear import SCALE_DTYPES, FP4Linear
from .base import BaseQuantizer
from .configs import FP4Config
from .registry import register_quantizer
from .smoothquant import plan_unpacked


@register_quantizer(FP4Config)
class FP4Quantizer(BaseQuantizer):
    """``FP4Quantizer(model, group_size=32, scale_dtype="float16").quantize()``."""

    needs_data = False
    produces = "FP4Linear"

    def _prepare(self) -> None:
        c = self.config
        self.blocks_name, _ = find_decoder_blocks(self.model)
        self.plan = plan_unpacked(self.model, c.skip_layers, self.blocks_name)
        gs = {n: c.for_layer(n).group_size for n in self.plan.quantize}
        bad = [f"{n} (group_size={gs[n]}, in_features={m.in_features})" for n, m in self.plan.quantize.items()
               if gs[n] != -1 and gs[n] > m.in_features]
        if bad:
            raise ValueError(f"group_size is larger than in_features of: {', '.join(bad)}")

    def _convert(self) -> None:
        for name, lin in tqdm(list(self.plan.quantize.items()), desc="FP4", disable=not self.verbose, leave=False):
            c = self.config.for_layer(name)
            codes, scales = quantize_fp4_groups(lin.weight, c.group_size, SCALE_DTYPES[c.scale_dtype], mse=c.mse)
            q = FP4Linear.from_codes(codes, scales, c.group_size, bias=lin.bias, dtype=lin.weight.dtype)
            q.name = name
            self.replace_module(name, q)
