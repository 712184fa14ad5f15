"""Undo a failed quantization: :class:`ModelSnapshot` records, before ``prepare``, everything that
``prepare`` / calibration / ``convert`` may change in a model, and puts it back when any of them raises.

What is recorded costs no copy of the weights: for every module its child modules, parameter and
buffer entries, forward hooks and instance attributes (a patched ``forward``, ``quantkern_config``),
and for every parameter / buffer a reference to its data. Code that rebinds ``tensor.data`` (GPTQ
running a Linear with its dequantized weight) is undone by rebinding; code that writes a tensor in place
(AWQ / SmoothQuant folding scales into norms and Linears) first calls :meth:`ModelSnapshot.writable`,
which gives the tensor a private copy the first time, so the recorded original stays intact.
"""

from __future__ import annotations

import torch
from torch import nn

# per-module OrderedDicts whose contents are recorded and restored (hook dicts differ across torch versions)
_DICTS = ("_modules", "_parameters", "_buffers", "_forward_pre_hooks", "_forward_hooks",
          "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


class ModelSnapshot:
    def __init__(self, model: nn.Module):
        self.model = model
        self._modules: list[tuple[nn.Module, dict, dict]] = []
        self._data: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for mod in model.modules():
            inner = {k: dict(mod.__dict__[k]) for k in _DICTS if isinstance(mod.__dict__.get(k), dict)}
            attrs = {k: v for k, v in mod.__dict__.items() if k not in inner}
            self._modules.append((mod, attrs, inner))
            for t in list(mod._parameters.values()) + list(mod._buffers.values()):
                if t is not None and id(t) not in self._data:
                    self._data[id(t)] = (t, t.data)

    def writable(self, t: torch.Tensor | None) -> None:
        """Call before writing ``t`` (a parameter or buffer of the model) in place: while ``t`` still
        holds its recorded data, give it a copy to write to (bit-identical values)."""
        if t is None:
            return
        entry = self._data.get(id(t))
        if entry is not None and t.data.data_ptr() == entry[1].data_ptr() and t.device.type != "meta":
            t.data = t.data.clone()

    def release(self, module: nn.Module) -> None:
        """``module`` was swapped out of the model: point its tensors back at their recorded data, so the
        working copies (dequantized weights, folded scales) are freed now rather than held to the end."""
        for t in list(module.parameters()) + list(module.buffers()):
            entry = self._data.get(id(t))
            if entry is not None and t.data is not entry[1]:
                t.data = entry[1]

    def restore(self) -> None:
        """Put every recorded module, hook, attribute and tensor back as it was."""
        for mod, attrs, inner in self._modules:
            for k, saved in inner.items():  # the dict objects themselves are in attrs, unchanged
                d = mod.__dict__[k]
                d.clear()
                d.update(saved)
            for k in [k for k in mod.__dict__ if k not in attrs and k not in inner]:
                del mod.__dict__[k]
            for k, v in attrs.items():
                mod.__dict__[k] = v
        with torch.no_grad():
            for t, data in self._data.values():
                t.data = data
