"""Conv1D transposition: transformers' ``Conv1D`` (GPT-2 style, ``y = x @ W + b`` with ``W [in, out]``)
into the equivalent ``nn.Linear`` the quantizers take."""

from __future__ import annotations

import torch
from torch import nn


def conv1d_to_linear(root: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` under ``root`` by an equivalent ``nn.Linear`` (weight
    transposed to ``[out, in]``); returns how many were replaced."""
    count = 0
    for name, mod in list(root.named_modules()):
        if type(mod).__name__ != "Conv1D" or not hasattr(mod, "nf"):
            continue
        w = mod.weight.data  # [in, out]
        lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if mod.bias is not None:
                lin.bias.copy_(mod.bias.data)
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, lin)
        count += 1
    return count
