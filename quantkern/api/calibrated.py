"""Shared plumbing of the block-by-block quantizers added beside GPTQ (AWQ, SmoothQuant, FP8, PTQ).

:class:`BlockwiseQuantizer` applies the common calibration settings (``num_calibrate`` and
``calibrate_seq_length`` to the data given to ``quantize``; ``offload`` to the captured inputs) and
installs / takes back the :class:`InputCatcher`; the
algorithms implement ``_convert`` with :func:`quantkern.calibration.run_block`.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..calibration import InputCatcher, normalize_calibration_data
from .base import BaseQuantizer
from .targets import check_not_quantized


class BlockwiseQuantizer(BaseQuantizer):
    needs_data = True

    def quantize(self, data=None, tokenizer=None, export_format: str | None = None):
        tokenizer = tokenizer or self.tokenizer
        c = self.config
        n, length = getattr(c, "num_calibrate", None), getattr(c, "calibrate_seq_length", None)
        if data is not None and (n is not None or length is not None):
            batches = normalize_calibration_data(data, tokenizer, max_length=length)
            if n is not None:
                batches = batches[:n]
            data = [{"input_ids": b.input_ids, "attention_mask": b.attention_mask} for b in batches]
        return super().quantize(data, tokenizer, export_format)

    def install_catcher(self, first_block) -> None:
        off = torch.device("cpu") if getattr(self.config, "offload", False) else None
        self.catcher = InputCatcher(self.model, first_block, offload_device=off).install()


class ActivationObservers:
    """Forward pre-hooks that feed each watched module's input rows (padding removed, using the
    ``attention_mask`` of the current model call) to an observer's ``update(x2d)``. Calibration runs
    ordinary full-model forwards; nothing is stopped early."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], make_observer):
        self.model = model
        self.modules = modules
        self.observers = {name: make_observer(name) for name in modules}
        self._mask: torch.Tensor | None = None
        self._hooks: list = []

    def install(self) -> "ActivationObservers":
        for name, mod in self.modules.items():
            self._hooks.append(mod.register_forward_pre_hook(lambda m, args, _n=name: self._observe(_n, args[0])))
        original = self.model.forward
        obs = self

        def forward(model_self, *args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            obs._mask = mask if mask is not None else (torch.ones_like(ids) if isinstance(ids, torch.Tensor) else None)
            kwargs.setdefault("use_cache", False)
            try:
                return original(*args, **kwargs)
            finally:
                obs._mask = None

        self.model.forward = types.MethodType(forward, self.model)
        return self

    def _observe(self, name: str, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        if self._mask is not None and self._mask.numel() == x2.shape[0]:
            x2 = x2[self._mask.reshape(-1).bool().to(x2.device)]
        try:
            self.observers[name].update(x2)
        except ValueError as e:
            if "inf/NaN" not in str(e):
                raise
            raise ValueError(f"{name}: non-finite inputs (inf/NaN) reached this layer during calibration; a layer "
                             "before it produces inf/NaN on the calibration data") from None

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        if "forward" in self.model.__dict__:
            del self.model.__dict__["forward"]


def check_no_quantized_modules(model: nn.Module) -> None:
    """Raise if ``model`` already holds quantized layers (see :func:`~quantkern.api.targets.check_not_quantized`)."""
    check_not_quantized(model)
