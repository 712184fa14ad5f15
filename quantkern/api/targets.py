"""Which modules get quantized, which are skipped and why — decided and validated before calibration."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

from torch import nn

from ..formats.gptq import packable
from ..nn import QuantLinear


def matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


@dataclass
class TargetPlan:
    quantize: dict[str, nn.Linear] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)

    def summary(self) -> str:
        """Skipped modules, with names that differ only by block index collapsed (``layers.*.norm (30x)``)."""
        counts: dict[tuple[str, str], int] = {}
        for name, reason in self.skipped:
            key = (re.sub(r"\.\d+\.", ".*.", name), reason)
            counts[key] = counts.get(key, 0) + 1
        lines = [f"quantized {len(self.quantize)} Linear layers; skipped {len(self.skipped)} modules:"]
        for (name, reason), c in counts.items():
            lines.append(f"  - {name}{f' ({c}x)' if c > 1 else ''}: {reason}")
        return "\n".join(lines)


def check_not_quantized(model: nn.Module) -> None:
    """Raise if ``model`` already holds quantized layers or a (non-GGUF) quantization config."""
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("model is already quantized (it contains QuantLinear layers); start from the dense model")
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        method = getattr(method, "value", method)
        # A GGUF model is dequantized to dense tensors at load: it is the dense model it looks like.
        if method not in (None, "gguf"):
            raise ValueError(f"model is already quantized (config.quantization_config.quant_method={method!r})")


def plan_targets(model: nn.Module, skip_layers, bits: int, group_size: int, within: str | None = None) -> TargetPlan:
    """Choose the Linears to quantize (inside ``within`` if given) and validate their shapes now,
    listing every offending layer, so that no calibration time is spent on a model that cannot be served."""
    check_not_quantized(model)
    plan = TargetPlan()
    bad: list[str] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if isinstance(mod, nn.Linear):
            if matches(name, skip_layers):
                plan.skipped.append((name, "matches skip_layers"))
            elif within is not None and not (name == within or name.startswith(within + ".")):
                plan.skipped.append((name, f"outside the decoder blocks ({within})"))
            else:
                k, n = mod.in_features, mod.out_features
                reason = packable(k, n, bits)
                if group_size != -1 and group_size > k:
                    reason = (reason + "; " if reason else "") + f"group_size={group_size} > in_features={k}"
                if reason:
                    bad.append(f"{name} ({k}->{n}): {reason}")
                else:
                    plan.quantize[name] = mod
        elif isinstance(mod, nn.Embedding):
            plan.skipped.append((name, "embedding (not a Linear)"))
        elif len(list(mod.children())) == 0 and any(True for _ in mod.parameters(recurse=False)):
            if "norm" in type(mod).__name__.lower():
                plan.skipped.append((name, f"{type(mod).__name__} (not a Linear)"))
            elif not isinstance(mod, nn.Linear):
                plan.skipped.append((name, f"{type(mod).__name__} is not nn.Linear"))
    if bad:
        raise ValueError(f"{len(bad)} layer(s) cannot be quantized with bits={bits}, group_size={group_size} "
                         "(exclude them with skip_layers=[...] or change the settings):\n  " + "\n  ".join(bad))
    if not plan.quantize:
        raise ValueError("model has no nn.Linear layers to quantize" +
                         (f" (all matched skip_layers={list(skip_layers)})" if plan.skipped else ""))
    return plan


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    hook = getattr(getattr(parent, child, None), "_hf_hook", None)
    if hook is not None:  # the replaced module was placed by an accelerate device map: keep it placed
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    setattr(parent, child, new)
