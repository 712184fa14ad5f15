"""Shared plumbing of the block-by-block quantizers added beside GPTQ (AWQ, SmoothQuant, FP8, PTQ).

:class:`BlockwiseQuantizer` applies the common calibration settings (``num_calibrate`` and
``calibrate_seq_length`` to the data given to ``quantize``; ``offload`` to the captured inputs) and
installs / takes back the :class:`InputCatcher`; the algorithms implement ``process_block`` (see
:mod:`quantkern.calibration.loop`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import InputCatcher, normalize_calibration_data
from .base import BaseQuantizer
from .targets import check_not_quantized


class BlockwiseQuantizer(BaseQuantizer):
    needs_data = True

    def calibration_items(self, data, tokenizer=None) -> list:
        """The calibration items of ``data``, cut to ``calibrate_seq_length`` tokens and the first
        ``num_calibrate`` items where the config sets them."""
        c = self.config
        n, length = getattr(c, "num_calibrate", None), getattr(c, "calibrate_seq_length", None)
        items = normalize_calibration_data(data, tokenizer, max_length=length)
        return items[:n] if n is not None else items

    def install_catcher(self, first_block) -> None:
        off = torch.device("cpu") if getattr(self.config, "offload", False) else None
        self.catcher = InputCatcher(self.model, first_block, offload_device=off).install()


def check_no_quantized_modules(model: nn.Module) -> None:
    """Raise if ``model`` already holds quantized layers (see :func:`~quantkern.api.targets.check_not_quantized`)."""
    check_not_quantized(model)
