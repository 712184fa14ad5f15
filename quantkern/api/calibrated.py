"""Shared plumbing of the block-by-block quantizers added beside GPTQ (AWQ, SmoothQuant, FP8, PTQ).

:class:`BlockwiseQuantizer` applies the common calibration settings (``num_calibrate`` and
``calibrate_seq_length`` to the data given to ``quantize``; ``offload`` to the captured inputs) and installs / takes back the :class:`InputCatcher`; the
algorithms implement ``_convert`` with :func:`quantkern.calibration.run_block`.
"""

from __future__ import annotations

import torch

from ..calibration import BlockInput, InputCatcher, normalize_calibration_data
from .base import BaseQuantizer


class BlockwiseQuantizer(BaseQuantizer):
    needs_data = True

    def quantize(self, data=None, tokenizer=None):
        tokenizer = tokenizer or self.tokenizer
        c = self.config
        n, length = getattr(c, "num_calibrate", None), getattr(c, "calibrate_seq_length", None)
        if data is not None and (n is not None or length is not None):
            batches = normalize_calibration_data(data, tokenizer, max_length=length)
            if n is not None:
                batches = batches[:n]
            data = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in batches]
        return super().quantize(data, tokenizer)

    def install_catcher(self, first_block) -> None:
        off = torch.device("cpu") if getattr(self.config, "offload", False) else None
        self.catcher = InputCatcher(self.model, first_block, offload_device=off).install()

    def take_inputs(self) -> list[BlockInput]:
        """Remove the catcher and return what the first block received; raises if nothing came."""
        self.catcher.remove()
        inputs, self.catcher = self.catcher.inputs, None
        if not inputs:
            raise RuntimeError("no calibration forwards reached the model between prepare() and convert(); "
                               "run model(input_ids=...) on calibration batches first")
        return inputs
