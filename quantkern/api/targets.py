"""Which modules get quantized, which are skipped and why — decided and validated before calibration."""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..arch import architecture_for
from ..formats.gptq import packable
from ..nn import QuantLinear


def matches(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or fnmatch.fnmatchcase(name, p) for p in patterns)


def check_overrides_apply(config, plan: "TargetPlan") -> None:
    """Raise ``ValueError`` before calibration for a per-layer override that would change nothing:
    its pattern matches no planned layer or experts module (a typo, a regex where a glob is expected,
    a skipped layer), or only ones an earlier pattern takes (the first match wins)."""
    overrides = getattr(config, "overrides", ()) or ()
    if not overrides:
        return
    names = list(plan.quantize) + list(plan.experts)
    used = set()
    for name in names:
        first = next((p for p, _ in overrides if matches(name, [p])), None)
        if first is not None:
            used.add(first)
    unused = [p for p, _ in overrides if p not in used]
    if unused:
        shadowed = [p for p in unused if any(matches(n, [p]) for n in names)]
        why = "; ".join([f"{p!r} matches no quantized layer" for p in unused if p not in shadowed]
                        + [f"{p!r} only layers an earlier pattern takes (the first match wins)" for p in shadowed])
        raise ValueError(f"overrides that change nothing: {why}. Patterns are fnmatch globs or dotted "
                         f"suffixes of module names (e.g. '*.down_proj', 'model.layers.0.mlp.down_proj'); "
                         f"planned layers include {names[:3]}")


# A group of decoder-block tensors (one name across the blocks) at least this share of the blocks'
# parameters must be quantized or skipped by a rule: left dense unnoticed it is how fused MoE experts
# (transformers 5 stores them as 3-D parameters, most of the model) were silently lost.
UNACCOUNTED_SHARE = 0.01


@dataclass
class TargetPlan:
    quantize: dict[str, nn.Linear] = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, reason)
    experts: dict[str, "ExpertsSite"] = field(default_factory=dict)  # fused MoE experts modules
    block_params: int = 0  # floating-point parameters of >= 2 dims in the decoder blocks
    quantized_params: int = 0  # of those, the ones quantized

    def in_block(self, prefix: str) -> tuple[dict[str, nn.Linear], dict[str, "ExpertsSite"]]:
        """The Linears and experts modules planned inside the block at ``prefix`` (``"model.layers.3."``),
        keyed by their names relative to it."""
        def inside(d):
            return {n[len(prefix):]: v for n, v in d.items() if n.startswith(prefix)}
        return inside(self.quantize), inside(self.experts)

    @property
    def quantized_share(self) -> float | None:
        """The quantized share of the decoder blocks' (>= 2-D, floating-point) parameters."""
        return self.quantized_params / self.block_params if self.block_params else None

    def summary(self) -> str:
        """Skipped modules, with names that differ only by block index collapsed (``layers.*.norm (30x)``)."""
        counts: dict[tuple[str, str], int] = {}
        for name, reason in self.skipped:
            key = (re.sub(r"\.\d+\.", ".*.", name), reason)
            counts[key] = counts.get(key, 0) + 1
        share = self.quantized_share
        n_exp = sum(x.num_experts for x in self.experts.values())
        lines = [f"quantized {len(self.quantize)} Linear layers"
                 + (f" and {n_exp} experts in {len(self.experts)} MoE experts modules" if self.experts else "")
                 + (f" ({share:.1%} of the decoder blocks' weights)" if share is not None else "")
                 + f"; skipped {len(self.skipped)} modules:"]
        for (name, reason), c in counts.items():
            lines.append(f"  - {name}{f' ({c}x)' if c > 1 else ''}: {reason}")
        return "\n".join(lines)


@dataclass
class ExpertsSite:
    """A fused 3-D MoE experts module (transformers 5) to quantize: every expert's fused gate/up
    projection (``[2I, H]`` as a Linear weight) and down projection (``[H, I]``) is a weight site, named
    ``{module}.{e}.gate_proj`` / ``.up_proj`` / ``.down_proj`` for patterns (``skip_layers``)."""

    module: nn.Module
    layout: object  # quantkern.arch.moe.ExpertsLayout
    num_experts: int
    hidden_size: int
    intermediate_size: int

    def site_names(self, name: str) -> list[str]:
        return [f"{name}.{e}.{p}" for e in range(self.num_experts) for p in ("gate_proj", "up_proj", "down_proj")]


def _quantized_kinds() -> tuple[type, ...]:
    """Every module type quantkern puts in place of a Linear."""
    from ..nn.fp4_linear import FP4Linear
    from ..nn.fp8_linear import FP8Linear
    from ..nn.quant_experts import QuantExperts
    from ..nn.w8a8_linear import W8A8Linear, ZeroQuantLinear

    return (QuantLinear, W8A8Linear, ZeroQuantLinear, FP8Linear, FP4Linear, QuantExperts)


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


def check_no_quantized_modules(model: nn.Module) -> None:
    """Raise if ``model`` holds any of quantkern's quantized layer types."""
    kinds = _quantized_kinds()
    found = [(n, type(m).__name__) for n, m in model.named_modules() if isinstance(m, kinds)]
    if found:
        types = sorted({t for _, t in found})
        raise ValueError(f"model is already quantized ({found[0][0]} is a {found[0][1]}; {len(found)} "
                         f"{'/'.join(types)} layers in all); start from the dense model")


def check_not_quantized(model: nn.Module) -> None:
    """Raise if ``model`` already holds quantized layers (any of quantkern's: QuantLinear, W8A8Linear,
    ZeroQuantLinear, FP8Linear, FP4Linear) or a (non-GGUF) quantization config."""
    check_no_quantized_modules(model)
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


def _plan_experts(plan: TargetPlan, name: str, mod: nn.Module, layout, skip_layers, bits: int, group_size: int,
                  bad: list[str]) -> None:
    """Plan one fused experts module: all its experts quantized, or (every site matching ``skip_layers``)
    none; a pattern that names only some of its sites is refused (one scheme per experts module)."""
    from ..arch.moe import experts_shape

    e, h, i = experts_shape(mod, layout)
    site = ExpertsSite(mod, layout, e, h, i)
    sites = site.site_names(name)
    hits = [s for s in sites if any(matches(c, skip_layers) for c in _chain(s))]
    if len(hits) == len(sites):
        return  # kept dense knowingly: the accounting lists its tensors as "matches skip_layers"
    if hits:
        raise ValueError(f"skip_layers={list(skip_layers)} matches {len(hits)} of the {len(sites)} expert weights of "
                         f"{name} (e.g. {hits[0]}); the experts of one module are quantized all together or not "
                         f"at all: skip {name!r} as a whole, or none of its experts")
    reasons = []
    for k, n, label in ((h, i, "gate/up"), (i, h, "down")):
        r = linear_problem(k, n, bits, group_size)
        if r:
            reasons.append(f"{label} {k}->{n} per expert: {r}")
    if reasons:
        bad.append(f"{name} ({type(mod).__name__}, {e} experts): " + "; ".join(reasons))
        return
    plan.experts[name] = site


def linear_problem(in_features: int, out_features: int, bits: int, group_size: int) -> str | None:
    """``None`` if a ``in_features -> out_features`` Linear can be quantized to ``bits`` with
    ``group_size`` (it packs, and a group is not wider than the layer), else why not."""
    r = packable(in_features, out_features, bits)
    if group_size != -1 and group_size > in_features:
        r = (r + "; " if r else "") + f"group_size={group_size} > in_features={in_features}"
    return r


def _chain(name: str) -> list[str]:
    """``a.b.c`` -> ``[a.b.c, a.b, a]``."""
    return [name.rsplit(".", i)[0] for i in range(name.count(".") + 1)]


def plan_targets(model: nn.Module, skip_layers, bits: int, group_size: int, within: str | None = None,
                 experts: bool = False, layer_config=None, on_load: bool = False) -> TargetPlan:
    """Choose the Linears to quantize (inside ``within`` if given) and validate their shapes now,
    listing every offending layer, so that no calibration time is spent on a model that cannot be served.

    ``layer_config``: ``name -> config`` with the layer's own ``bits`` / ``group_size`` (per-layer
    overrides, :meth:`~quantkern.api.config.PerLayer.for_layer`); default: ``bits`` and ``group_size``.

    ``experts``: the quantizer also quantizes fused 3-D MoE experts modules (``plan.experts``); without
    it they are refused by the accounting, as every tensor no rule covers. MoE routers stay dense.

    ``on_load``: the model is being loaded by transformers with quantkern's own ``quantization_config``
    (:mod:`quantkern.hf`), whose config is set before its dense layers are replaced: only quantized
    modules count as already quantized."""
    if on_load:
        check_no_quantized_modules(model)
    else:
        check_not_quantized(model)

    def settings(name: str) -> tuple[int, int]:
        c = layer_config(name) if layer_config is not None else None
        return (bits, group_size) if c is None else (c.bits, c.group_size)

    plan = TargetPlan()
    bad: list[str] = []
    overridden = 0
    conv1d: list[str] = []
    arch = architecture_for(model)
    modules = dict(model.named_modules())
    for name, mod in modules.items():
        if not name:
            continue
        layout = arch.experts_layout(mod) if experts else None
        if layout is not None:
            if within is None or name.startswith(within + "."):
                _plan_experts(plan, name, mod, layout, skip_layers, *settings(name), bad)
        elif isinstance(mod, nn.Linear) and arch.is_router(name, mod, model):
            plan.skipped.append((name, "MoE router (Linear), kept dense"))
        elif is_conv1d(mod):
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
                lb, lg = settings(name)
                reason = linear_problem(k, n, lb, lg)
                if reason:
                    own = (lb, lg) != (bits, group_size)
                    overridden += own
                    bad.append(f"{name} ({k}->{n}{f', override bits={lb}, group_size={lg}' if own else ''}): {reason}")
                else:
                    plan.quantize[name] = mod
        elif isinstance(mod, nn.Embedding):
            plan.skipped.append((name, "embedding (not a Linear)"))
        elif any(True for _ in mod.parameters(recurse=False)) and arch.is_router(name, mod, model):
            plan.skipped.append((name, f"MoE router ({type(mod).__name__}), kept dense"))
        elif len(list(mod.children())) == 0 and any(True for _ in mod.parameters(recurse=False)):
            if arch.is_norm(name, mod):
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
        if overridden == len(bad):
            raise ValueError("per-layer overrides that cannot be quantized:\n  " + "\n  ".join(bad))
        raise ValueError(f"{len(bad)} layer(s) cannot be quantized with bits={bits}, group_size={group_size} "
                         "(exclude them with skip_layers=[...] or change the settings):\n  " + "\n  ".join(bad))
    if not plan.quantize and not plan.experts:
        n_skipped = sum(1 for _, r in plan.skipped if r == "matches skip_layers")
        raise ValueError("model has no nn.Linear layers to quantize" +
                         (f" (all matched skip_layers={list(skip_layers)}: {n_skipped} layers)" if n_skipped else ""))
    check_finite_weights(plan.quantize)
    check_finite_experts(plan.experts)
    account_block_parameters(model, plan, skip_layers)
    return plan


def check_finite_experts(experts: dict[str, ExpertsSite]) -> None:
    """Raise ``ValueError`` naming every expert whose weights hold inf / NaN."""
    bad = []
    for name, site in experts.items():
        for pname in (site.layout.gate_up, site.layout.down):
            t = getattr(site.module, pname)
            if t.device.type != "meta":
                per = (~torch.isfinite(t.detach())).flatten(1).sum(1)
                bad += [f"{name}.{e}.{pname} ({int(per[e])} inf/NaN)" for e in per.nonzero().flatten().tolist()]
    if bad:
        raise ValueError(f"non-finite expert weights in {len(bad)} tensor(s): " + ", ".join(bad) + "; repair the "
                         "checkpoint, or keep the experts in full precision with skip_layers=['experts']")


def account_block_parameters(model: nn.Module, plan: TargetPlan, skip_layers) -> None:
    """Account for every floating-point tensor of >= 2 dims inside the decoder blocks: quantized, or
    skipped with a reason (user pattern, router, outside the plan's kinds). A tensor that no rule covers
    and that, summed over the blocks, holds >= ``UNACCOUNTED_SHARE`` of the blocks' parameters raises
    ``ValueError`` naming it (before calibration): that is a weight the user would lose without a word,
    such as fused 3-D MoE experts. Smaller ones are listed as skipped. Sets ``plan.block_params`` and
    ``plan.quantized_params``; a model whose decoder blocks cannot be found is left unaccounted."""
    arch = architecture_for(model)
    try:
        prefix, _ = arch.find_blocks(model)
    except ValueError:
        return
    modules = dict(model.named_modules())
    skipped = {n for n, _ in plan.skipped}
    unaccounted: dict[str, list[tuple[str, tuple, int]]] = {}
    total = quantized = 0
    for pname, p in model.named_parameters():
        if not pname.startswith(prefix + ".") or p.dim() < 2 or not p.is_floating_point():
            continue
        total += p.numel()
        owner, _, leaf = pname.rpartition(".")
        site = plan.experts.get(owner)
        if site is not None and leaf in (site.layout.gate_up_bias, site.layout.down_bias):
            total -= p.numel()  # per-expert biases: kept in full precision with the experts, as Linear biases are
            continue
        if (owner in plan.quantize and leaf == "weight") or site is not None:
            quantized += p.numel()
            continue
        chain = [owner.rsplit(".", i)[0] for i in range(owner.count(".") + 1)]  # owner and its parents
        if any(c in skipped for c in chain):
            continue
        if any(matches(c, skip_layers) for c in chain):
            plan.skipped.append((pname, "matches skip_layers"))
        elif arch.is_router(owner, modules[owner], model):
            plan.skipped.append((pname, f"MoE router ({type(modules[owner]).__name__}), kept dense"))
        else:
            key = re.sub(r"\.\d+\.", ".*.", pname)
            unaccounted.setdefault(key, []).append((pname, tuple(p.shape), p.numel()))
    plan.block_params, plan.quantized_params = total, quantized
    lost = []
    for key, items in unaccounted.items():
        n = sum(i[2] for i in items)
        kind = type(modules[items[0][0].rpartition(".")[0]]).__name__
        if total and n / total >= UNACCOUNTED_SHARE:
            what = "fused MoE experts, " if items[0][1] and len(items[0][1]) == 3 else ""
            lost.append(f"{key if len(items) > 1 else items[0][0]} ({len(items)}x {list(items[0][1])}, {kind}; {what}{n / total:.1%} of the blocks' "
                        "parameters)")
        else:
            plan.skipped.extend((i[0], f"{kind} parameter of shape {list(i[1])}: not a kind quantkern quantizes "
                                 f"(kept dense, under {UNACCOUNTED_SHARE:.0%} of the blocks)") for i in items)
    if lost:
        raise ValueError(
            f"{len(lost)} weight tensor(s) inside the decoder blocks would be left in full precision without any "
            "rule saying so: " + "; ".join(lost) + ". This quantizer quantizes nn.Linear layers; these are not "
            "(3-D fused MoE experts are quantized by RTNQuantizer and GPTQQuantizer only). Keep them dense knowingly "
            "with skip_layers=[...] (e.g. 'experts') or quantize another layout of the model")


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    hook = getattr(getattr(parent, child, None), "_hf_hook", None)
    if hook is not None:  # the replaced module was placed by an accelerate device map: keep it placed
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    setattr(parent, child, new)
