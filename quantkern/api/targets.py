"""Which modules get quantized, which are skipped and why — decided and validated before calibration."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
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


def _quantized_kinds() -> tuple[type, ...]:
    """Every module type quantkern puts in place of a Linear."""
    from ..nn.fp4_linear import FP4Linear
    from ..nn.fp8_linear import FP8Linear
    from ..nn.w8a8_linear import W8A8Linear, ZeroQuantLinear

    return (QuantLinear, W8A8Linear, ZeroQuantLinear, FP8Linear, FP4Linear)


def _collapse(names) -> str:
    """``a.0.x, a.1.x`` -> ``a.*.x (2x)``: names that differ only by block index, once."""
    counts: dict[str, int] = {}
    for n in names:
        key = re.sub(r"\.\d+\.", ".*.", n)
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{k} ({c}x)" if c > 1 else k for k, c in counts.items())


def is_conv1d(mod: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 style projections: ``y = x @ W + b`` with ``W [in, out]``)."""
    return type(mod).__name__ == "Conv1D" and hasattr(mod, "nf")


def check_not_quantized(model: nn.Module) -> None:
    """Raise if ``model`` already holds quantized layers (any of quantkern's: QuantLinear, W8A8Linear,
    ZeroQuantLinear, FP8Linear, FP4Linear) or a (non-GGUF) quantization config."""
    kinds = _quantized_kinds()
    found = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, kinds)]
    if found:
        types = sorted({t for _, t in found})
        raise ValueError(f"model is already quantized ({found[0][0]} is a {found[0][1]}; {len(found)} "
                         f"{'/'.join(types)} layers in all); start from the dense model")
    qc = getattr(getattr(model, "config", None), "quantization_config", None)
    if qc is not None:
        method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
        method = getattr(method, "value", method)
        # A GGUF model is dequantized to dense tensors at load: it is the dense model it looks like.
        if method not in (None, "gguf"):
            raise ValueError(f"model is already quantized (config.quantization_config.quant_method={method!r})")


def check_finite_weights(modules: dict[str, nn.Module]) -> None:
    """Raise ``ValueError`` naming every layer whose weight or bias holds inf / NaN (meta tensors,
    which hold no values, are not looked at). One host sync per layer."""
    bad = []
    for name, mod in modules.items():
        for pname in ("weight", "bias"):
            t = getattr(mod, pname, None)
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.is_floating_point():
                if not bool(torch.isfinite(t).all()):
                    n = int((~torch.isfinite(t)).sum())
                    bad.append(f"{name}.{pname} ({n} inf/NaN value{'s' if n > 1 else ''})")
    if bad:
        raise ValueError(f"non-finite weights in {len(bad)} tensor(s), which no quantization grid can hold: "
                         + ", ".join(bad) + "; repair or reload the checkpoint, or leave the layers in full "
                         "precision with skip_layers=[...]")


def plan_targets(model: nn.Module, skip_layers, bits: int, group_size: int, within: str | None = None) -> TargetPlan:
    """Choose the Linears to quantize (inside ``within`` if given) and validate their shapes now,
    listing every offending layer, so that no calibration time is spent on a model that cannot be served."""
    check_not_quantized(model)
    plan = TargetPlan()
    bad: list[str] = []
    conv1d: list[str] = []
    for name, mod in model.named_modules():
        if not name:
            continue
        if is_conv1d(mod):
            if matches(name, skip_layers):
                plan.skipped.append((name, "matches skip_layers"))
            elif within is not None and not (name == within or name.startswith(within + ".")):
                plan.skipped.append((name, f"outside the decoder blocks ({within})"))
            else:
                conv1d.append(name)
        elif isinstance(mod, nn.Linear):
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
    if conv1d:
        raise ValueError(
            f"{len(conv1d)} transformers Conv1D layer(s) (GPT-2 style, weight stored [in, out]) cannot be quantized: "
            f"{_collapse(conv1d)}. quantkern quantizes nn.Linear layers, and a checkpoint of quantized Conv1D "
            "layers could not be loaded back by load_quantized; leave them in full precision with skip_layers=[...] "
            "to quantize only the model's nn.Linear layers")
    if bad:
        raise ValueError(f"{len(bad)} layer(s) cannot be quantized with bits={bits}, group_size={group_size} "
                         "(exclude them with skip_layers=[...] or change the settings):\n  " + "\n  ".join(bad))
    if not plan.quantize:
        n_skipped = sum(1 for _, r in plan.skipped if r == "matches skip_layers")
        raise ValueError("model has no nn.Linear layers to quantize" +
                         (f" (all matched skip_layers={list(skip_layers)}: {n_skipped} layers)" if n_skipped else ""))
    check_finite_weights(plan.quantize)
    return plan


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    hook = getattr(getattr(parent, child, None), "_hf_hook", None)
    if hook is not None:  # the replaced module was placed by an accelerate device map: keep it placed
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    setattr(parent, child, new)
